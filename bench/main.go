// Command bench is `make bench`: it starts a throwaway durable PostgreSQL, loads
// `customers` and `orders`, and measures in one run the raw limits PostgreSQL
// sets on this machine (bulk copy, offline ALTER) side by side with shadowctl's
// trigger and logical sync modes and pg_repack, under a pgbench OLTP workload.
//
// It prints a markdown table (figures, then the targets of issue 8), writes
// bench/results/latest.json (and latest.md), and stops its cluster on every
// exit path. A figure that could not be measured is null in the JSON and
// "not measured: <reason>" in the table: never a made-up number.
//
// Files: main.go (configuration, orchestration), cluster.go (server, data,
// resets, machine facts), workload.go (pgbench and per-transaction log
// slicing), shadowctl.go (the CLI under test), scenarios.go (the measurements),
// report.go (tables and JSON).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config is the run's size and shape, from the environment.
type config struct {
	Rows      int           // BENCH_ROWS
	Customers int           // fixed: 200,000
	Load      time.Duration // BENCH_SECONDS: length of fixed load windows
	Clients   int           // BENCH_CLIENTS
	Threads   int           // pgbench -j
	Warmup    time.Duration // workload ramp-up before any window opens
	After     time.Duration // workload kept running after an event, to catch stalls and errors
	SyncWin   time.Duration // window at `ready` where only the sync runs
	Bin       string        // the shadowctl binary (SHADOWCTL_BIN, default bin/shadowctl)
	OutDir    string        // bench/results
	Keep      bool          // BENCH_KEEP=1 keeps the work folder (pgbench logs, CLI output)
	// IdleReps (BENCH_IDLE_REPS, default 3) is how many times the raw limit
	// and each mode's time to ready at idle are measured; the median is the
	// figure. One run of each scattered by ±15 % on the shared machine.
	IdleReps int
	// Only, when not empty (BENCH_ONLY=raw,trigger,…), runs just those
	// scenarios: raw, baseline, trigger, logical, repack, alter; "idle" skips
	// the shadowctl runs under load. For working on one figure; a partial run
	// never replaces bench/results/latest.json.
	Only map[string]bool
	// Swaps (BENCH_SWAPS, default 3) is how many cutovers the trigger load
	// run makes (each after a rollback); the cutover figures are their
	// medians. One swap's hold and the workload's worst transaction around
	// it scattered by 2–5× between runs of the same code, too much to say
	// whether the swap grows with the table. Logical sync swaps from the
	// stream only once per migration (later swaps are trigger swaps), so
	// its samples are the load run's cutover and one after each of the
	// first Swaps-1 idle runs (at most IdleReps of them).
	Swaps int
	// StartArgs (BENCH_START_ARGS, split on spaces) are added to every
	// `shadowctl start`, e.g. "--load-share 0.5": for comparing settings.
	// A run with them is reported as such (settings.start_args).
	StartArgs []string
	// ScaleFrom (BENCH_SCALE_FROM, e.g. 2000000 in a run of 8,000,000 rows)
	// also seeds a table of that size, and times each mode's start to
	// ready at idle at both sizes, alternately, IdleReps times: the scale
	// target in one run, where the host's speed has no time to drift
	// between the two sizes (it moved by 45 % within an hour).
	ScaleFrom int
}

func loadConfig() (config, error) {
	c := config{
		Rows:      2_000_000,
		Customers: 200_000,
		Load:      20 * time.Second,
		Clients:   4,
		Warmup:    2 * time.Second,
		After:     2 * time.Second,
		Bin:       "bin/shadowctl",
		OutDir:    filepath.Join("bench", "results"),
		Keep:      os.Getenv("BENCH_KEEP") == "1",
	}
	var err error
	if c.Rows, err = envInt("BENCH_ROWS", c.Rows); err != nil {
		return c, err
	}
	secs, err := envInt("BENCH_SECONDS", int(c.Load/time.Second))
	if err != nil {
		return c, err
	}
	c.Load = time.Duration(secs) * time.Second
	if c.Clients, err = envInt("BENCH_CLIENTS", c.Clients); err != nil {
		return c, err
	}
	if c.Swaps, err = envInt("BENCH_SWAPS", 3); err != nil {
		return c, err
	}
	if c.Swaps < 1 {
		return c, fmt.Errorf("BENCH_SWAPS must be ≥ 1 (got %d)", c.Swaps)
	}
	if c.IdleReps, err = envInt("BENCH_IDLE_REPS", 3); err != nil {
		return c, err
	}
	if c.IdleReps < 1 {
		return c, fmt.Errorf("BENCH_IDLE_REPS must be ≥ 1 (got %d)", c.IdleReps)
	}
	if c.Rows < 1000 || c.Load < 2*time.Second || c.Clients < 1 {
		return c, fmt.Errorf("BENCH_ROWS must be ≥ 1000, BENCH_SECONDS ≥ 2 and BENCH_CLIENTS ≥ 1 (got %d, %s, %d)", c.Rows, c.Load, c.Clients)
	}
	c.Threads = min(c.Clients, max(runtime.NumCPU(), 1))
	c.SyncWin = max(c.Load/2, 5*time.Second)
	if b := os.Getenv("SHADOWCTL_BIN"); b != "" {
		c.Bin = b
	}
	c.StartArgs = strings.Fields(os.Getenv("BENCH_START_ARGS"))
	if c.ScaleFrom, err = envInt("BENCH_SCALE_FROM", 0); err != nil {
		return c, err
	}
	if c.ScaleFrom != 0 && (c.ScaleFrom < 1000 || c.ScaleFrom >= c.Rows) {
		return c, fmt.Errorf("BENCH_SCALE_FROM must be at least 1000 and below BENCH_ROWS (%d), or unset (got %d)", c.Rows, c.ScaleFrom)
	}
	if v := os.Getenv("BENCH_ONLY"); v != "" {
		c.Only = map[string]bool{}
		known := map[string]bool{"raw": true, "baseline": true, "trigger": true, "logical": true, "repack": true, "alter": true, "idle": true}
		for _, name := range strings.Split(v, ",") {
			name = strings.TrimSpace(name)
			if !known[name] {
				return c, fmt.Errorf("BENCH_ONLY=%q: unknown scenario %q (known: raw, baseline, trigger, logical, repack, alter, idle)", v, name)
			}
			c.Only[name] = true
		}
	}
	return c, nil
}

func envInt(name string, def int) (int, error) {
	v := os.Getenv(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("%s=%q: %w", name, v, err)
	}
	return n, nil
}

func main() {
	os.Exit(run())
}

// run does the whole benchmark; every exit path stops the cluster (deferred),
// and SIGINT/SIGTERM cancel the context so that deferred clean-up runs.
func run() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := loadConfig()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	b, err := newBench(ctx, cfg)
	if b != nil {
		defer b.Close()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	clockCtx, stopClock := context.WithCancel(ctx)
	defer stopClock()
	b.cpu = startCPUClock(clockCtx)
	res, err := b.runAll(ctx)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			fmt.Fprintln(os.Stderr, "bench: interrupted")
			return 130
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	if err := b.report(res); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	return 0
}

// logf prints progress to stderr (stdout carries only the report).
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s bench: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

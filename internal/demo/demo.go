// Package demo runs shadowctl's end-to-end demonstration (`shadowctl demo`,
// `make demo`): a throwaway PostgreSQL, a customers table and an orders table
// of a million rows, a live write load of several clients through
// public.orders for the whole scenario, and the seed migration (amount float8
// → numeric(12,2), plus customer_email filled from customers) driven through
// start, cutover, rollback, a second cutover and finalize. It ends with a
// report and an exact comparison of the final table with what the load wrote.
//
// It owns the demo's data, its load generator and its report. It does not
// own any migration logic: every step is a call into package shadow, exactly
// as the CLI commands make them.
package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pgcluster"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// DefaultSoak is how long the load runs on each side after a swap.
const DefaultSoak = 3 * time.Second

// ErrFailed means the demo ran but did not prove its point: a client saw an
// error, or the final table differs from what the load wrote.
var ErrFailed = errors.New("demo failed")

// The seed scenario.
const (
	scenarioAlter = "ALTER COLUMN amount TYPE numeric(12,2), ADD COLUMN customer_email text"
	emailMapping  = "(SELECT email FROM customers c WHERE c.id = customer_id)"
)

// Config tunes a demo run.
type Config struct {
	// Rows is the number of seeded orders (default 1,000,000).
	Rows int64
	// Customers is the number of customers (default 20,000).
	Customers int
	// Clients is the number of load clients (default 4).
	Clients int
	// Soak is how long the load runs on each side after a swap (default 3s);
	// each soak also waits for at least SoakOps operations (default 200).
	Soak    time.Duration
	SoakOps int64
	// BatchSize and Workers are the copy's (0: shadowctl's defaults).
	BatchSize, Workers int
	// LoadShare is the copy's duty cycle while the load runs (0: shadowctl's
	// default, 0.2 with trigger sync; the CLI passes 1, flat out, so that the
	// demo is short).
	LoadShare float64
	// DSN, when set, is an empty database to run in instead of a throwaway
	// cluster (the integration test uses it).
	DSN string
	// Keep leaves the throwaway cluster running after the report, until ctx
	// ends (Ctrl-C), and prints its DSN.
	Keep bool
	// Out receives the narrative and the report.
	Out io.Writer
	// Live redraws a progress line in place (a terminal); otherwise plain
	// lines are printed every ProgressEvery (default 5s).
	Live          bool
	ProgressEvery time.Duration
	// Log is the runner's logger.
	Log zerolog.Logger
}

func (c *Config) defaults() {
	if c.Rows <= 0 {
		c.Rows = 1_000_000
	}
	if c.Customers <= 0 {
		c.Customers = 20_000
	}
	if c.Clients <= 0 {
		c.Clients = 4
	}
	if c.Soak < 0 {
		c.Soak = 0
	} else if c.Soak == 0 {
		c.Soak = DefaultSoak
	}
	if c.SoakOps <= 0 {
		c.SoakOps = 200
	}
	if c.ProgressEvery <= 0 {
		c.ProgressEvery = 5 * time.Second
	}
	if c.Out == nil {
		c.Out = io.Discard
	}
}

// Step is one timed step of the scenario.
type Step struct {
	Name string
	Took time.Duration
}

// Swap is one swap's measurements: the tool's (attempts, lock wait and hold,
// from the catalog) and the clients' (slowest operation while it ran).
type Swap struct {
	Kind       string
	Took       time.Duration
	Attempts   int
	LockWaitMS float64
	LockHoldMS float64
	Load       *PhaseStats
}

// Report is what a demo run measured.
type Report struct {
	DSN          string
	MigrationID  string
	SeedRows     int64
	SeedTook     time.Duration
	RowsCopied   int64
	Steps        []Step
	Verify       cutover.VerifyResult
	Swaps        []Swap
	LoadPhases   []*PhaseStats
	Ops, Errors  int64
	ErrorSamples []string
	Check        CheckResult
	Leftovers    []string
	Definition   string
	Total        time.Duration
}

// OK reports whether the demo proved its point.
func (r *Report) OK() bool {
	return r.Errors == 0 && r.Check.OK() && len(r.Leftovers) == 0
}

// Run runs the demo and returns its report. The error wraps ErrFailed when
// the run completed but a client saw an error or the final state differs.
// The throwaway cluster is stopped and removed on every path (Ctrl-C
// included: ctx ends, every step returns, the deferred stop runs).
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.defaults()
	began := time.Now()
	out := cfg.Out
	rep := &Report{SeedRows: cfg.Rows}

	dsn := cfg.DSN
	if dsn == "" {
		binDir, err := pgcluster.FindBinDir()
		if err != nil {
			return nil, fmt.Errorf("%w\n  install the PostgreSQL server packages (as root: apt-get install -y postgresql, or `make postgres`), then run the demo again", err)
		}
		say(out, "▸ starting a throwaway PostgreSQL from %s (fsync off: it is thrown away afterwards)", binDir)
		t := time.Now()
		srv, err := pgcluster.Start(ctx, binDir, pgcluster.Options{Settings: map[string]string{
			"max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'", "shared_buffers": "'256MB'",
		}})
		if err != nil {
			return nil, fmt.Errorf("start PostgreSQL: %w", err)
		}
		defer func() {
			srv.Stop()
			say(out, "▸ PostgreSQL stopped and its folder %s removed", srv.Dir)
		}()
		dsn = srv.AdminDSN
		say(out, "  ready in %s at %s", round(time.Since(t)), dsn)
	}
	rep.DSN = dsn

	pcfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	pcfg.MaxConns = 16
	pcfg.ConnConfig.RuntimeParams["application_name"] = "shadowctl"
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	defer pool.Close()

	say(out, "▸ creating customers (%d rows) and orders (%d rows, indexes on customer_id and created_at)", cfg.Customers, cfg.Rows)
	t := time.Now()
	if err := Seed(ctx, pool, cfg.Rows, cfg.Customers); err != nil {
		return nil, err
	}
	rep.SeedTook = time.Since(t)
	say(out, "  done in %s (%.0f rows/s, generate_series; indexes and the foreign key built after the load)", round(rep.SeedTook), float64(cfg.Rows)/rep.SeedTook.Seconds())

	say(out, "▸ starting the write load: %d clients through public.orders (INSERT … RETURNING, UPDATE by id, DELETE, SELECT … FOR UPDATE, INSERT … ON CONFLICT)", cfg.Clients)
	load, err := StartLoad(ctx, dsn, cfg.Clients, cfg.Rows, cfg.Customers)
	if err != nil {
		return nil, err
	}
	stopped := false
	stopLoad := func() {
		if !stopped {
			stopped = true
			load.Stop()
		}
	}
	defer stopLoad()
	if err := load.WaitOps(ctx, 50); err != nil {
		return nil, fmt.Errorf("the load did not start: %w (%v)", err, load.ErrorSamples())
	}
	say(out, "  running (the pool uses QueryExecModeExec: no server-side prepared-statement cache, see the report)")

	runner := shadow.NewRunner(pool, catalog.New(""), cfg.Log)
	d := &driver{cfg: cfg, out: out, runner: runner, load: load, rep: rep}
	if err := d.scenario(ctx); err != nil {
		return rep, err
	}

	load.SetPhase("after finalize")
	if err := d.soak(ctx, 0); err != nil {
		return rep, err
	}
	stopLoad()
	rep.LoadPhases = load.Phases()
	rep.Ops, rep.Errors, rep.ErrorSamples = load.Ops(), load.Errors(), load.ErrorSamples()

	say(out, "▸ checking public.orders row by row against the load's model")
	t = time.Now()
	if rep.Check, err = load.Check(ctx, dsn, true); err != nil {
		return rep, err
	}
	rep.Steps = append(rep.Steps, Step{"final check", time.Since(t)})
	if rep.Leftovers, err = leftovers(ctx, pool); err != nil {
		return rep, err
	}
	if rep.Definition, err = describe(ctx, pool, ordersTable); err != nil {
		return rep, err
	}
	rep.Total = time.Since(began)
	rep.Print(out)
	if !rep.OK() {
		return rep, fmt.Errorf("%w: %d client errors, final state %s, %d leftover objects", ErrFailed, rep.Errors,
			map[bool]string{true: "exact", false: "different"}[rep.Check.OK()], len(rep.Leftovers))
	}
	if cfg.Keep && cfg.DSN == "" {
		say(out, "\n--keep: PostgreSQL stays up (it lives as long as this process); connect with\n  psql '%s'\npress Ctrl-C to stop it and remove its folder", dsn)
		<-ctx.Done()
	}
	return rep, nil
}

// driver runs the scenario's steps.
type driver struct {
	cfg    Config
	out    io.Writer
	runner *shadow.Runner
	load   *Load
	rep    *Report
	id     string
}

func (d *driver) scenario(ctx context.Context) error {
	req := shadow.Request{
		Table: "public.orders", Alter: scenarioAlter,
		Map:       map[string]string{"customer_email": emailMapping},
		BatchSize: d.cfg.BatchSize, Workers: d.cfg.Workers, LoadShare: d.cfg.LoadShare,
	}
	share := ""
	if req.LoadShare > 0 && req.LoadShare != shadow.DefaultLoadShare(req.Sync) {
		share = fmt.Sprintf(" --load-share %g", req.LoadShare)
	}
	say(d.out, "▸ shadowctl start --table public.orders --alter %q --map 'customer_email=%s'%s", scenarioAlter, emailMapping, share)
	if req.LoadShare == 1 {
		say(d.out, "  (--load-share 1: one copy worker flat out while the load runs, to keep the demo short; by default it works a fifth of its time and leaves the application more room)")
	}
	d.load.SetPhase("start: submit")
	t := time.Now()
	m, err := d.runner.Submit(ctx, req)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	d.id, d.rep.MigrationID = m.ID, m.ID
	say(d.out, "  migration %s submitted (~%d rows estimated)", m.ID, m.RowsEstimated)
	stop := d.progress(ctx, m)
	m, err = d.runner.Drive(ctx, m.ID, shadow.Ready)
	stop()
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	took := time.Since(t)
	d.rep.RowsCopied = m.RowsCopied
	if len(m.Verify) > 0 {
		_ = json.Unmarshal(m.Verify, &d.rep.Verify)
	}
	steps, err := d.phaseTimes(ctx)
	if err != nil {
		return err
	}
	d.rep.Steps = append(d.rep.Steps, steps...)
	d.rep.Steps = append(d.rep.Steps, Step{"start → ready (total)", took})
	say(d.out, "  %s is ready after %s: %d rows copied, verified %d rows in %d chunks (%d repaired)", m.ID, round(took),
		m.RowsCopied, d.rep.Verify.Rows, d.rep.Verify.Chunks, d.rep.Verify.Repaired)

	opts := shadow.CutoverOptions{}
	steps2 := []struct {
		kind, cmd, after string
		green            bool
		run              func() (*shadow.Migration, error)
	}{
		{"cutover", "shadowctl cutover " + d.id, "serving green (view over green.orders)", true,
			func() (*shadow.Migration, error) { return d.runner.Cutover(ctx, d.id, opts) }},
		{"rollback", "shadowctl rollback " + d.id, "serving blue again", false,
			func() (*shadow.Migration, error) { return d.runner.Rollback(ctx, d.id, opts) }},
		{"cutover", "shadowctl cutover " + d.id + "   (again)", "serving green", true,
			func() (*shadow.Migration, error) { return d.runner.Cutover(ctx, d.id, opts) }},
		{"finalize", "shadowctl finalize --force " + d.id, "", true,
			func() (*shadow.Migration, error) { return d.runner.Finalize(ctx, d.id, 0, true, opts) }},
	}
	for _, s := range steps2 {
		say(d.out, "▸ %s", s.cmd)
		ph := d.load.SetPhase(s.kind)
		d.load.BeginSwap()
		t := time.Now()
		m, err := s.run()
		took := time.Since(t)
		if err != nil {
			return fmt.Errorf("%s: %w", s.kind, err)
		}
		d.load.EndSwap(s.green)
		sw := Swap{Kind: s.kind, Took: took, Load: ph}
		if s.kind == "finalize" {
			if err := d.finalizeRecord(ctx, &sw); err != nil {
				return err
			}
		} else if lc := m.State.LastCutover; lc != nil {
			sw.Attempts, sw.LockWaitMS, sw.LockHoldMS = lc.Attempts, lc.LockWaitMS, lc.LockHoldMS
		}
		d.rep.Swaps = append(d.rep.Swaps, sw)
		d.rep.Steps = append(d.rep.Steps, Step{s.kind, took})
		note := s.after
		if note == "" {
			note = "public.orders is green's own table again; blue and the sync are gone"
		}
		say(d.out, "  %s in %s: %d attempt(s), lock wait %.1f ms, lock held %.1f ms; %s", m.Phase, round(took), sw.Attempts, sw.LockWaitMS, sw.LockHoldMS, note)
		if s.after != "" {
			d.load.SetPhase(s.after)
			t := time.Now()
			if err := d.soak(ctx, d.cfg.Soak); err != nil {
				return err
			}
			say(d.out, "  load ran %s on that side: %d ops, %d errors", round(time.Since(t)), d.load.Current().Ops(), d.load.Current().Errors())
		}
	}
	return nil
}

// soak lets the load run for at least dur and SoakOps operations.
func (d *driver) soak(ctx context.Context, dur time.Duration) error {
	t := time.NewTimer(dur)
	defer t.Stop()
	if err := d.load.WaitOps(ctx, d.cfg.SoakOps); err != nil {
		return err
	}
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// finalizeRecord reads finalize's swap measurements from the event log
// (finalize leaves last_cutover as the last view swap).
func (d *driver) finalizeRecord(ctx context.Context, sw *Swap) error {
	evs, err := d.runner.Store.Events(ctx, d.id)
	if err != nil {
		return fmt.Errorf("read events: %w", err)
	}
	for i := len(evs) - 1; i >= 0; i-- {
		if evs[i].Kind != "finalize" {
			continue
		}
		var res cutover.SwapResult
		if err := json.Unmarshal(evs[i].Data, &res); err != nil {
			return fmt.Errorf("finalize event: %w", err)
		}
		sw.Attempts = res.Attempts
		sw.LockWaitMS = float64(res.LockWait.Microseconds()) / 1000
		sw.LockHoldMS = float64(res.LockHold.Microseconds()) / 1000
		return nil
	}
	return nil
}

// phaseTimes reads how long preparing, copying and verifying took from the
// migration's event log.
func (d *driver) phaseTimes(ctx context.Context) ([]Step, error) {
	evs, err := d.runner.Store.Events(ctx, d.id)
	if err != nil {
		return nil, fmt.Errorf("read events: %w", err)
	}
	var steps []Step
	var cur string
	var since time.Time
	for _, e := range evs {
		if e.Kind != "phase" {
			continue
		}
		var ch struct{ To string }
		if err := json.Unmarshal(e.Data, &ch); err != nil {
			continue
		}
		if cur != "" && cur != ch.To {
			steps = append(steps, Step{"  " + cur, e.At.Sub(since)})
		}
		cur, since = ch.To, e.At
	}
	return steps, nil
}

// progress shows the copy: a line redrawn in place on a terminal, plain lines
// every ProgressEvery elsewhere.
func (d *driver) progress(ctx context.Context, m *shadow.Migration) func() {
	var copied atomic.Int64
	d.runner.Progress = func(_ string, n int64) { copied.Add(n) }
	// The phase is polled often, so that the load's measurements split at
	// the phase changes; the line is printed every `every`.
	const poll = 200 * time.Millisecond
	every := d.cfg.ProgressEvery
	if d.cfg.Live {
		every = 600 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tk := time.NewTicker(poll)
		defer tk.Stop()
		start, phaseStart := time.Now(), time.Now()
		phase := string(m.Phase)
		lastOps, lastAt := d.load.Ops(), time.Now()
		var lastCopied int64
		var copyTook time.Duration // time to the last copied batch
		d.load.SetPhase("start: " + phase)
		for {
			select {
			case <-ctx.Done():
				if d.cfg.Live {
					fmt.Fprint(d.out, "\r\033[K")
				}
				return
			case <-tk.C:
			}
			if cur, err := d.runner.Store.Get(ctx, d.runner.Pool, m.ID); err == nil && string(cur.Phase) != phase {
				phase, phaseStart = string(cur.Phase), time.Now()
				d.load.SetPhase("start: " + phase)
			}
			if n := copied.Load(); n != lastCopied {
				lastCopied, copyTook = n, time.Since(start)
			}
			if time.Since(lastAt) < every {
				continue
			}
			var what string
			switch {
			case phase == string(shadow.Verifying):
				what = fmt.Sprintf("chunked checksums, green against blue, %s so far", time.Since(phaseStart).Round(time.Second))
			case phase == string(shadow.Copying) && lastCopied >= m.RowsEstimated:
				what = d.indexProgress(ctx, m, lastCopied)
			default:
				rate := 0.0
				if copyTook > 0 {
					rate = float64(lastCopied) / copyTook.Seconds()
				}
				what = progressLine(lastCopied, m.RowsEstimated, rate)
			}
			ops := d.load.Ops()
			tps := float64(ops-lastOps) / time.Since(lastAt).Seconds()
			lastOps, lastAt = ops, time.Now()
			line := fmt.Sprintf("%-9s %s | load %4.0f ops/s, %d errors", phase, what, tps, d.load.Errors())
			if d.cfg.Live {
				fmt.Fprintf(d.out, "\r\033[K  %s", line)
			} else {
				say(d.out, "  %s %s", time.Now().Format("15:04:05"), line)
			}
		}
	}()
	return func() {
		cancel()
		<-done
		d.runner.Progress = nil
	}
}

// indexProgress says which of green's indexes is being built, from
// pg_stat_progress_create_index (the copy is done by then).
func (d *driver) indexProgress(ctx context.Context, m *shadow.Migration, copied int64) string {
	var idx, phase string
	var done, total int64
	err := d.runner.Pool.QueryRow(ctx, `SELECT coalesce(nullif(p.index_relid, 0)::regclass::text, '…'), p.phase,
			CASE WHEN p.blocks_total > 0 THEN p.blocks_done ELSE p.tuples_done END,
			CASE WHEN p.blocks_total > 0 THEN p.blocks_total ELSE p.tuples_total END
		  FROM pg_stat_progress_create_index p JOIN pg_class c ON c.oid = p.relid
		 WHERE c.relnamespace = to_regnamespace($1) LIMIT 1`, pgsql.Ident(m.GreenSchema)).Scan(&idx, &phase, &done, &total)
	if err != nil {
		return fmt.Sprintf("copied %d rows; building green's indexes and constraints", copied)
	}
	pct := ""
	if total > 0 {
		pct = fmt.Sprintf(" %.0f%%", float64(done)*100/float64(total))
	}
	return fmt.Sprintf("building green's index %s CONCURRENTLY: %s%s", idx, phase, pct)
}

func progressLine(n, est int64, rate float64) string {
	pct := 0.0
	if est > 0 {
		pct = min(100, float64(n)*100/float64(est))
	}
	const width = 20
	filled := int(pct / 100 * width)
	bar := strings.Repeat("█", filled) + strings.Repeat("░", width-filled)
	eta := "?"
	if n >= est {
		eta = "0s"
	} else if rate > 0 {
		eta = (time.Duration(float64(est-n)/rate) * time.Second).Round(time.Second).String()
	}
	return fmt.Sprintf("%s %5.1f%% %d/%d rows %6.0f rows/s ETA %s", bar, pct, n, est, rate, eta)
}

// leftovers lists what the tool should have removed: sync triggers and
// functions, the green schema, blue's parked table.
func leftovers(ctx context.Context, q pgsql.Querier) ([]string, error) {
	rows, err := q.Query(ctx, `
		SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass FROM pg_trigger WHERE NOT tgisinternal
		UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname = 'green'
		UNION ALL SELECT 'function ' || p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'shadowctl'
		UNION ALL SELECT 'table ' || c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v') AND c.relname NOT IN ('orders', 'customers')`)
	if err != nil {
		return nil, fmt.Errorf("leftovers: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, fmt.Errorf("leftovers: %w", err)
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

func say(w io.Writer, format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }

func round(d time.Duration) time.Duration {
	switch {
	case d >= 10*time.Second:
		return d.Round(100 * time.Millisecond)
	case d >= time.Second:
		return d.Round(10 * time.Millisecond)
	default:
		return d.Round(100 * time.Microsecond)
	}
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/shadowctl/shadowctl/internal/gate"
	"github.com/shadowctl/shadowctl/shadow"
	"github.com/urfave/cli/v2"
)

func init() {
	register(startCommand())
	register(driveCommand())
	register(statusCommand())
	register(&cli.Command{
		Name:      "list",
		Usage:     "list migrations",
		ArgsUsage: " ",
		Flags:     []cli.Flag{&cli.BoolFlag{Name: "json"}},
		Action: func(c *cli.Context) error {
			return withRunner(c, func(r *shadow.Runner) error {
				ms, err := r.Store.List(c.Context)
				if err != nil {
					return err
				}
				var out []shadow.Status
				for _, m := range ms {
					out = append(out, r.Store.Status(c.Context, m, time.Now()))
				}
				if c.Bool("json") {
					return json.NewEncoder(c.App.Writer).Encode(out)
				}
				tw := tabwriter.NewWriter(c.App.Writer, 2, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tTABLE\tPHASE\tSERVING\tPROGRESS\tERROR")
				for _, s := range out {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.0f%%\t%s\n", s.ID, s.Table, s.Phase, s.Serving, s.ProgressPct, oneLine(s.Error, 60))
				}
				return tw.Flush()
			})
		},
	})
	register(&cli.Command{
		Name:      "follow",
		Usage:     "logical sync: apply blue's changes to green until interrupted or the migration moves on",
		ArgsUsage: "ID",
		Action: withMigration(func(c *cli.Context, r *shadow.Runner, id string) error {
			err := r.Follow(c.Context, id)
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}),
	})
	register(&cli.Command{
		Name:      "abort",
		Usage:     "remove everything a migration created (while blue serves) and mark it aborted",
		ArgsUsage: "ID",
		Action: withMigration(func(c *cli.Context, r *shadow.Runner, id string) error {
			if err := r.Abort(c.Context, id, ""); err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "migration %s aborted; blue is as it was\n", id)
			return nil
		}),
	})
}

func oneID(c *cli.Context) (string, error) {
	if c.NArg() != 1 {
		return "", cli.Exit(fmt.Sprintf("%s needs exactly one migration ID (see `shadowctl list`)", c.Command.Name), 2)
	}
	return c.Args().First(), nil
}

// withMigration is the action of a command that takes one migration ID: it
// checks the argument and opens the runner.
func withMigration(fn func(c *cli.Context, r *shadow.Runner, id string) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		id, err := oneID(c)
		if err != nil {
			return err
		}
		return withRunner(c, func(r *shadow.Runner) error { return fn(c, r, id) })
	}
}

// withRunner opens a pool and a runner for one command.
func withRunner(c *cli.Context, fn func(r *shadow.Runner) error) error {
	p, err := pool(c, 16)
	if err != nil {
		return err
	}
	defer p.Close()
	return fn(shadow.NewRunner(p, catalogOf(c), logger(c)))
}

func startCommand() *cli.Command {
	return &cli.Command{
		Name:  "start",
		Usage: "submit a blue-green migration and drive it until --until (default ready)",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "table", Usage: "the table to change: schema.table or table"},
			&cli.StringFlag{Name: "alter", Usage: "the sub-commands that follow ALTER TABLE <table>, applied to green"},
			&cli.StringSliceFlag{Name: "map", Usage: "green column = SQL over blue's columns (repeatable)"},
			&cli.StringSliceFlag{Name: "reverse-map", Usage: "blue column = SQL over green's columns, for the reverse sync (repeatable)"},
			&cli.StringFlag{Name: "plan", Usage: "read the request from a YAML or JSON file (flags override it)"},
			&cli.StringFlag{Name: "green-schema", Usage: "schema for the green table (default green)"},
			&cli.StringFlag{Name: "sync", Usage: "trigger or logical (default trigger)"},
			&cli.IntFlag{Name: "batch-size", Usage: "largest copy batch (default 10000; batches adapt to ~0.5 s)"},
			&cli.IntFlag{Name: "max-rows-per-second", Usage: "copy rate cap (0: none)"},
			&cli.IntFlag{Name: "workers", Usage: "parallel copy workers (default 2)"},
			&cli.Float64Flag{Name: "load-share", Usage: "while the application is busy: one copy worker, working this share of its time (default 0.2 with trigger sync, 0.33 with logical; 1: flat out)"},
			&cli.StringFlag{Name: "max-extra-storage", Usage: "refuse when green would need more (e.g. 50GB)"},
			&cli.DurationFlag{Name: "lock-timeout", Usage: "lock_timeout of every statement that locks the table (default 100ms)"},
			&cli.StringFlag{Name: "max-retained-wal", Usage: "logical sync: stop and drop the slot when it pins more WAL (default 16GiB)"},
			&cli.StringFlag{Name: "until", Value: "ready", Usage: "drive the migration up to this phase (pending: submit only)"},
			&cli.BoolFlag{Name: "detach", Usage: "only record the migration for the daemon (same as --until pending)"},
			&cli.StringFlag{Name: "wait", Usage: "with --detach: block until the daemon brings the migration to this phase (exit statuses as `shadowctl wait`)"},
			&cli.DurationFlag{Name: "wait-timeout", Value: 24 * time.Hour, Usage: "with --wait: give up (exit 2) after this long"},
			&cli.StringFlag{Name: "name", Usage: "migration ID (default: <table>-<time>-<random>)"},
			&cli.BoolFlag{Name: "no-progress", Usage: "no live progress line"},
		}, daemonRequestFlags()...),
		Action: func(c *cli.Context) error {
			req, err := requestFromFlags(c)
			if err != nil {
				return cli.Exit(err.Error(), 2)
			}
			until, err := shadow.ParsePhase(c.String("until"))
			if err != nil {
				return cli.Exit(err.Error(), 2)
			}
			if c.Bool("detach") {
				until = shadow.Pending
			}
			if w := c.String("wait"); w != "" {
				if !c.Bool("detach") {
					return cli.Exit("start: --wait goes with --detach (without it, start drives the migration itself up to --until)", 2)
				}
				if err := gate.ValidatePhase(w); err != nil {
					return cli.Exit("start: --wait: "+err.Error(), 2)
				}
			}
			return withRunner(c, func(r *shadow.Runner) error {
				m, err := r.Submit(c.Context, req)
				if err != nil {
					return err
				}
				fmt.Fprintf(c.App.Writer, "migration %s submitted for %s\n", m.ID, m.Table)
				if phase := c.String("wait"); phase != "" && until == shadow.Pending {
					return waitForPhase(c, m.ID, phase, c.Duration("wait-timeout"), 2*time.Second)
				}
				if until == shadow.Pending {
					return nil
				}
				id := m.ID
				stop := startProgress(c, r, m)
				m, err = r.Drive(c.Context, id, until)
				stop()
				if err != nil {
					if errors.Is(err, context.Canceled) {
						return fmt.Errorf("interrupted; the migration keeps its checkpoint: run `shadowctl drive %s` or `shadowctl abort %s`: %w", id, id, err)
					}
					return err
				}
				fmt.Fprintf(c.App.Writer, "migration %s is %s\n", m.ID, m.Phase)
				return nil
			})
		},
	}
}

// driveCommand drives an existing migration from its last checkpoint: after
// a killed or interrupted `start`, or one submitted with --detach.
func driveCommand() *cli.Command {
	return &cli.Command{
		Name:  "drive",
		Usage: "drive an existing migration from its last checkpoint until --until (default ready)",
		Description: "After `start` was killed or interrupted (or submitted with --detach), drive continues the\n" +
			"migration where its catalog checkpoint says it stopped: finished copy ranges are not copied again.\n" +
			"A failed migration is retried from the phase it failed in (trigger sync only).\n" +
			"It fails if another process drives the migration now.",
		ArgsUsage: "ID",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "until", Value: "ready", Usage: "drive the migration up to this phase"},
			&cli.BoolFlag{Name: "no-progress", Usage: "no live progress line"},
		},
		Action: func(c *cli.Context) error {
			id, err := oneID(c)
			if err != nil {
				return err
			}
			until, err := shadow.ParsePhase(c.String("until"))
			if err != nil {
				return cli.Exit(err.Error(), 2)
			}
			return withRunner(c, func(r *shadow.Runner) error {
				m, err := r.Retry(c.Context, id) // a failed migration continues from its checkpoints
				if err != nil {
					return err
				}
				stop := startProgress(c, r, m)
				m, err = r.Drive(c.Context, id, until)
				stop()
				if err != nil {
					if errors.Is(err, context.Canceled) {
						return fmt.Errorf("interrupted; the migration keeps its checkpoint: run `shadowctl drive %s` again or `shadowctl abort %s`: %w", id, id, err)
					}
					return err
				}
				fmt.Fprintf(c.App.Writer, "migration %s is %s\n", m.ID, m.Phase)
				if m.Sync == shadow.SyncLogical && m.Phase == shadow.Ready {
					fmt.Fprintf(c.App.Writer, "logical sync: green stays current only while a process applies the stream: run `shadowctl follow %s` or the daemon (the cutover also applies it)\n", m.ID)
				}
				return nil
			})
		},
	}
}

func requestFromFlags(c *cli.Context) (shadow.Request, error) {
	var req shadow.Request
	if f := c.String("plan"); f != "" {
		var err error
		if req, err = shadow.LoadPlanFile(f); err != nil {
			return req, err
		}
	}
	set := func(name string, dst *string) {
		if c.IsSet(name) {
			*dst = c.String(name)
		}
	}
	set("table", &req.Table)
	set("alter", &req.Alter)
	set("green-schema", &req.GreenSchema)
	set("name", &req.ID)
	set("max-extra-storage", &req.MaxExtraStorageS)
	set("max-retained-wal", &req.MaxRetainedWALS)
	if c.IsSet("sync") {
		req.Sync = shadow.SyncMode(c.String("sync"))
	}
	for name, dst := range map[string]*int{"batch-size": &req.BatchSize, "max-rows-per-second": &req.MaxRowsPerSecond, "workers": &req.Workers} {
		if c.IsSet(name) {
			*dst = c.Int(name)
		}
	}
	if c.IsSet("lock-timeout") {
		req.LockTimeout = c.Duration("lock-timeout")
	}
	if c.IsSet("load-share") {
		req.LoadShare = c.Float64("load-share")
	}
	if v := c.StringSlice("map"); len(v) > 0 {
		m, err := shadow.ParseAssignments("map", v)
		if err != nil {
			return req, err
		}
		req.Map = m
	}
	if v := c.StringSlice("reverse-map"); len(v) > 0 {
		m, err := shadow.ParseAssignments("reverse-map", v)
		if err != nil {
			return req, err
		}
		req.ReverseMap = m
	}
	if err := applyDaemonFlags(c, &req); err != nil {
		return req, err
	}
	return req, req.Normalize()
}

// startProgress shows a live progress line on a terminal (rows copied,
// rows/s, ETA); elsewhere the runner's log lines tell the story.
func startProgress(c *cli.Context, r *shadow.Runner, m *shadow.Migration) func() {
	f, ok := c.App.ErrWriter.(*os.File)
	if c.Bool("no-progress") || !ok || !isatty.IsTerminal(f.Fd()) {
		return func() {}
	}
	var copied atomic.Int64
	copied.Store(m.RowsCopied)
	r.Progress = func(_ string, n int64) { copied.Add(n) }
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		start, base := time.Now(), copied.Load()
		for {
			select {
			case <-done:
				fmt.Fprint(f, "\r\033[K")
				return
			case <-t.C:
				n := copied.Load()
				rate := float64(n-base) / time.Since(start).Seconds()
				fmt.Fprintf(f, "\r\033[K%s", progressLine(n, m.RowsEstimated, rate))
			}
		}
	}()
	return func() { close(done); <-finished }
}

func progressLine(n, est int64, rate float64) string {
	pct := 0.0
	if est > 0 {
		pct = min(100, float64(n)*100/float64(est))
	}
	const width = 30
	filled := int(pct / 100 * width)
	bar := strings.Repeat("█", filled) + strings.Repeat("░", width-filled)
	eta := "?"
	if rate > 0 && est > n {
		eta = (time.Duration(float64(est-n)/rate) * time.Second).Round(time.Second).String()
	}
	return fmt.Sprintf("copying %s %5.1f%%  %d/%d rows  %.0f rows/s  ETA %s", bar, pct, n, est, rate, eta)
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:      "status",
		Usage:     "show a migration (or all active ones)",
		ArgsUsage: "[ID]",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "the documented JSON schema (docs/status.md)"},
			&cli.BoolFlag{Name: "watch", Usage: "redraw every second until interrupted"}},
		Action: watchable(func(c *cli.Context) error {
			return withRunner(c, func(r *shadow.Runner) error {
				var ms []*shadow.Migration
				if c.NArg() > 0 {
					m, err := r.Store.Get(c.Context, r.Pool, c.Args().First())
					if err != nil {
						return err
					}
					ms = append(ms, m)
				} else {
					all, err := r.Store.List(c.Context)
					if err != nil {
						return err
					}
					for _, m := range all {
						if !m.Phase.Terminal() {
							ms = append(ms, m)
						}
					}
				}
				now := time.Now()
				if c.Bool("json") {
					out := []shadow.Status{}
					for _, m := range ms {
						st := r.Store.Status(c.Context, m, now)
						out = append(out, st)
					}
					if c.NArg() > 0 {
						return json.NewEncoder(c.App.Writer).Encode(out[0])
					}
					return json.NewEncoder(c.App.Writer).Encode(out)
				}
				if len(ms) == 0 {
					fmt.Fprintln(c.App.Writer, "no active migrations")
				}
				for _, m := range ms {
					st := r.Store.Status(c.Context, m, now)
					printStatus(c.App.Writer, st)
				}
				return nil
			})
		}),
	}
}

func printStatus(w io.Writer, s shadow.Status) {
	fmt.Fprintf(w, "migration %s — %s\n", s.ID, s.Table)
	fmt.Fprintf(w, "  phase:     %s%s (since %s)\n", s.Phase, map[bool]string{true: " [paused]"}[s.Paused], s.PhaseSince.Local().Format(time.DateTime))
	fmt.Fprintf(w, "  serving:   %s   sync: %s   green: %s\n", s.Serving, s.Sync, s.GreenTable)
	fmt.Fprintf(w, "  change:    %s\n", s.Alter)
	fmt.Fprintf(w, "  copied:    %d / ~%d rows (%.0f%%)", s.RowsCopied, s.RowsEstimated, s.ProgressPct)
	if s.RowsPerSecond > 0 {
		fmt.Fprintf(w, ", %.0f rows/s", s.RowsPerSecond)
	}
	if s.ETASeconds != nil {
		fmt.Fprintf(w, ", ETA %s", (time.Duration(*s.ETASeconds) * time.Second).String())
	}
	fmt.Fprintln(w)
	if s.SyncLagBytes != nil {
		fmt.Fprintf(w, "  sync lag:  %d bytes, %.1f s\n", *s.SyncLagBytes, s.SyncLagSeconds)
	}
	if string(s.Verify) != "null" {
		fmt.Fprintf(w, "  verified:  %s\n", s.Verify)
	}
	if s.LastCutover != nil {
		fmt.Fprintf(w, "  last swap: %s at %s, %s\n", s.LastCutover.Kind,
			s.LastCutover.At.Local().Format(time.DateTime), s.LastCutover.Summary())
	}
	if s.Error != "" {
		fmt.Fprintf(w, "  error:     %s\n", s.Error)
	}
	printDaemonStatus(w, s)
}

func oneLine(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

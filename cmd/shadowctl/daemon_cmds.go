package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
	"github.com/urfave/cli/v2"
)

// daemonRequestFlags are the flags of `start` that the daemon acts on.
func daemonRequestFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "cutover", Usage: "cutover policy for the daemon: manual, auto or window (default manual; window with --window)"},
		&cli.StringFlag{Name: "window", Usage: `cutover window, e.g. "Sat,Sun 02:00-04:00 Europe/Berlin" (docs/daemon.md)`},
		&cli.TimestampFlag{Name: "cutover-at", Layout: time.RFC3339, Usage: "automatic cutover not before this time (RFC 3339)"},
		&cli.BoolFlag{Name: "auto-rollback", Usage: "after the cutover, roll back on its own when verification finds a difference"},
		&cli.DurationFlag{Name: "verify-every", Usage: "how often the daemon verifies after the cutover (default 1m with --auto-rollback)"},
		&cli.StringSliceFlag{Name: "hook", Usage: "EVENT=COMMAND run by the daemon on a lifecycle event (repeatable; docs/daemon.md)"},
		&cli.StringFlag{Name: "throttle-query", Usage: "SQL returning true while the copy must wait"},
		&cli.DurationFlag{Name: "max-replica-lag", Usage: "pause the copy while a replica's replay lag exceeds this"},
	}
}

// applyDaemonFlags copies the daemon's flags into a request.
func applyDaemonFlags(c *cli.Context, req *shadow.Request) error {
	if c.IsSet("cutover") {
		req.CutoverPolicy = c.String("cutover")
	}
	if c.IsSet("window") {
		req.Window = c.String("window")
	}
	if t := c.Timestamp("cutover-at"); t != nil {
		req.CutoverAt = t
	}
	if c.IsSet("auto-rollback") {
		req.AutoRollback = c.Bool("auto-rollback")
	}
	if c.IsSet("verify-every") {
		req.VerifyEvery = c.Duration("verify-every")
	}
	if c.IsSet("throttle-query") {
		req.ThrottleQuery = c.String("throttle-query")
	}
	if c.IsSet("max-replica-lag") {
		req.MaxReplicaLag = c.Duration("max-replica-lag")
	}
	if v := c.StringSlice("hook"); len(v) > 0 {
		h, err := shadow.ParseHooks(v)
		if err != nil {
			return err
		}
		req.Hooks = h
	}
	return nil
}

func init() {
	register(&cli.Command{
		Name:  "daemon",
		Usage: "drive every migration of the catalog: phases, scheduled cutovers, verification after the cutover, hooks, metrics",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "http", Usage: "serve /metrics, /healthz and /v1/migrations on this address (e.g. 127.0.0.1:9187; off by default)"},
			&cli.StringFlag{Name: "token-file", Usage: "file holding the bearer token of the state-changing HTTP endpoints (off without it)"},
			&cli.DurationFlag{Name: "poll", Value: 2 * time.Second, Usage: "read the catalog this often besides LISTEN/NOTIFY"},
		},
		Action: func(c *cli.Context) error {
			var token string
			if f := c.String("token-file"); f != "" {
				b, err := os.ReadFile(f)
				if err != nil {
					return cli.Exit(fmt.Sprintf("--token-file: %v", err), 2)
				}
				if token = strings.TrimSpace(string(b)); token == "" {
					return cli.Exit("--token-file is empty", 2)
				}
			}
			return withRunner(c, func(r *shadow.Runner) error {
				d, err := daemon.New(daemon.Config{Runner: r, Log: logger(c), Poll: c.Duration("poll"), HTTPAddr: c.String("http"), Token: token})
				if err != nil {
					return err
				}
				// SIGINT/SIGTERM end c.Context: every migration stops at a checkpoint.
				return d.Run(c.Context)
			})
		},
	})
	control := func(name, usage string, fn func(s *shadow.Store, ctx context.Context, id, actor string) error, done string) {
		register(&cli.Command{
			Name: name, Usage: usage, ArgsUsage: "ID",
			Action: withMigration(func(c *cli.Context, r *shadow.Runner, id string) error {
				if err := fn(r.Store, c.Context, id, shadow.LocalActor()); err != nil {
					return err
				}
				fmt.Fprintf(c.App.Writer, "migration %s %s\n", id, done)
				return nil
			}),
		})
	}
	control("pause", "stop a migration's copy and the daemon's work on it at the next checkpoint", (*shadow.Store).Pause, "paused")
	control("resume", "lift a pause or a postponed cutover", (*shadow.Store).Resume, "resumed")
	control("postpone", "hold an automatic or scheduled cutover until `resume` or `cutover` releases it", (*shadow.Store).Postpone, "cutover postponed")
	register(&cli.Command{
		Name:      "set",
		Usage:     "change copy settings of a migration; a running copy applies them before its next batch",
		ArgsUsage: "ID key=value ... (batch_size, max_rows_per_second, workers)",
		Action: func(c *cli.Context) error {
			if c.NArg() < 2 {
				return cli.Exit("set needs a migration ID and key=value pairs (batch_size, max_rows_per_second, workers)", 2)
			}
			settings, err := shadow.ParseSettings(c.Args().Tail())
			if err != nil {
				return cli.Exit(err.Error(), 2)
			}
			id := c.Args().First()
			return withRunner(c, func(r *shadow.Runner) error {
				if err := r.Store.Set(c.Context, id, shadow.LocalActor(), settings); err != nil {
					return err
				}
				fmt.Fprintf(c.App.Writer, "migration %s: %s set\n", id, strings.Join(c.Args().Tail(), " "))
				return nil
			})
		},
	})
	register(&cli.Command{
		Name:      "events",
		Usage:     "a migration's audit log: when, who, what",
		ArgsUsage: "ID",
		Flags:     []cli.Flag{&cli.BoolFlag{Name: "json"}},
		Action: withMigration(func(c *cli.Context, r *shadow.Runner, id string) error {
			if _, err := r.Store.Get(c.Context, r.Pool, id); err != nil {
				return err
			}
			evs, err := r.Store.Events(c.Context, id)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				if evs == nil {
					evs = []shadow.EventRecord{}
				}
				return json.NewEncoder(c.App.Writer).Encode(evs)
			}
			tw := tabwriter.NewWriter(c.App.Writer, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "AT\tACTOR\tKIND\tMESSAGE")
			for _, e := range evs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.At.Local().Format("2006-01-02 15:04:05.000"), e.Actor, e.Kind, oneLine(e.Message, 160))
			}
			return tw.Flush()
		}),
	})
}

// scheduleCutover records --at/--window for the daemon instead of swapping.
// Both `cutover --at T ID` and `cutover ID --at T` are accepted (the CLI
// library stops reading flags at the first argument).
func scheduleCutover(c *cli.Context) error {
	at, win := c.Timestamp("at"), c.String("window")
	args := c.Args().Slice()
	if len(args) == 0 {
		return cli.Exit("cutover needs a migration ID", 2)
	}
	id, rest := args[0], args[1:]
	for len(rest) > 0 {
		name, val, hasVal := strings.Cut(strings.TrimLeft(rest[0], "-"), "=")
		if !strings.HasPrefix(rest[0], "-") || (name != "at" && name != "window") {
			return cli.Exit(fmt.Sprintf("cutover: unexpected %q (usage: cutover ID [--at TIME | --window SPEC])", rest[0]), 2)
		}
		rest = rest[1:]
		if !hasVal {
			if len(rest) == 0 {
				return cli.Exit("cutover: --"+name+" needs a value", 2)
			}
			val, rest = rest[0], rest[1:]
		}
		if name == "window" {
			win = val
			continue
		}
		t, err := time.Parse(time.RFC3339, val)
		if err != nil {
			return cli.Exit(fmt.Sprintf("cutover --at %q: use RFC 3339, e.g. 2026-12-05T02:00:00+01:00", val), 2)
		}
		at = &t
	}
	if (at == nil) == (win == "") {
		return cli.Exit("give --at TIME or --window SPEC (one of them)", 2)
	}
	return withRunner(c, func(r *shadow.Runner) error {
		var err error
		if win != "" {
			err = r.Store.SetCutoverPolicy(c.Context, id, shadow.LocalActor(), shadow.CutoverWindow, win, nil)
		} else {
			err = r.Store.SetCutoverPolicy(c.Context, id, shadow.LocalActor(), shadow.CutoverAuto, "", at)
		}
		if err != nil {
			return err
		}
		if win != "" {
			fmt.Fprintf(c.App.Writer, "migration %s: the daemon cuts over inside the window %q\n", id, win)
		} else {
			fmt.Fprintf(c.App.Writer, "migration %s: the daemon cuts over at %s\n", id, at.Format(time.RFC3339))
		}
		return nil
	})
}

// watchable makes a command redraw its output every second with --watch,
// until interrupted.
func watchable(action cli.ActionFunc) cli.ActionFunc {
	return func(c *cli.Context) error {
		if !c.Bool("watch") {
			return action(c)
		}
		return watch(c, func() error { return action(c) })
	}
}

// watch redraws fn's output every second until interrupted.
func watch(c *cli.Context, fn func() error) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		fmt.Fprint(c.App.Writer, "\033[H\033[2J")
		fmt.Fprintf(c.App.Writer, "%s  (every 1s, Ctrl-C to stop)\n\n", time.Now().Format(time.DateTime))
		if err := fn(); err != nil {
			fmt.Fprintf(c.App.Writer, "error: %s\n", redactAll(err.Error(), os.Args))
		}
		select {
		case <-c.Context.Done():
			return nil
		case <-t.C:
		}
	}
}

// printDaemonStatus prints the status lines added for the daemon.
func printDaemonStatus(w io.Writer, s shadow.Status) {
	line := fmt.Sprintf("  cutover:   %s", s.CutoverPolicy)
	if s.CutoverWindow != nil {
		line += " " + *s.CutoverWindow
	}
	if s.NextWindow != nil {
		if s.NextWindow.Open {
			line += fmt.Sprintf(" (open until %s)", s.NextWindow.End.Format(time.RFC3339))
		} else {
			line += fmt.Sprintf(" (next %s – %s)", s.NextWindow.Start.Format(time.RFC3339), s.NextWindow.End.Format(time.RFC3339))
		}
	}
	if s.CutoverHeld {
		line += " [postponed]"
	}
	if s.AutoRollback {
		line += ", auto-rollback"
	}
	fmt.Fprintln(w, line)
	fmt.Fprintf(w, "  settings:  batch_size=%d max_rows_per_second=%d workers=%d   sync lag: %.1fs\n", s.BatchSize, s.MaxRowsPerSecond, s.Workers, s.SyncLagSeconds)
	if s.Throttled != nil {
		fmt.Fprintf(w, "  throttled: %s\n", *s.Throttled)
	}
	if s.Driver != nil {
		drv := fmt.Sprintf("  driver:    %s since %s", s.Driver.Daemon, s.Driver.Since.Local().Format(time.DateTime))
		if s.Driver.ReleasedAt != nil {
			drv += fmt.Sprintf(", released %s", s.Driver.ReleasedAt.Local().Format(time.DateTime))
		}
		if s.Driver.LastError != "" {
			drv += ", last error: " + oneLine(s.Driver.LastError, 120)
		}
		fmt.Fprintln(w, drv)
	}
}

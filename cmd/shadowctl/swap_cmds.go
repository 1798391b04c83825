package main

import (
	"fmt"
	"time"

	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/shadow"
	"github.com/urfave/cli/v2"
)

func swapFlags() []cli.Flag {
	return []cli.Flag{
		&cli.DurationFlag{Name: "lock-timeout", Value: 100 * time.Millisecond, Usage: "longest wait in the lock queue per attempt (the longest stall the application can see)"},
		&cli.DurationFlag{Name: "deadline", Value: 5 * time.Minute, Usage: "give up retrying after this long (the database stays as it was)"},
		&cli.DurationFlag{Name: "cancel-blockers-after", Usage: "after this long, cancel the sessions that block the swap (off unless given)"},
		&cli.DurationFlag{Name: "max-cutover-stall", Value: 2 * time.Second, Usage: "logical sync: longest time writes wait while the stream drains; past it the attempt is released and retried"},
	}
}

func swapOptionsFrom(c *cli.Context) shadow.CutoverOptions {
	log := logger(c)
	return shadow.CutoverOptions{
		LockTimeout: c.Duration("lock-timeout"), Deadline: c.Duration("deadline"), CancelBlockersAfter: c.Duration("cancel-blockers-after"),
		MaxCutoverStall: c.Duration("max-cutover-stall"),
		OnAttempt: func(a cutover.Attempt) {
			ev := log.Warn().Int("attempt", a.No).Str("error", a.Err)
			for i, b := range a.Blockers {
				ev = ev.Str(fmt.Sprintf("blocker_%d", i+1), b.String())
			}
			ev.Msg("lock not granted in time; will retry")
		},
	}
}

func init() {
	register(&cli.Command{
		Name:      "cutover",
		Usage:     "swap the table to green (a view over it) in one short transaction; blue stays current for a rollback (--at/--window: let the daemon do it then)",
		ArgsUsage: "ID",
		Flags: append(swapFlags(),
			&cli.TimestampFlag{Name: "at", Layout: time.RFC3339, Usage: "let the daemon cut over at this time (RFC 3339) instead of now"},
			&cli.StringFlag{Name: "window", Usage: `let the daemon cut over inside this window, e.g. "Sat,Sun 02:00-04:00 Europe/Berlin"`}),
		Action: func(c *cli.Context) error {
			if c.IsSet("at") || c.IsSet("window") || c.NArg() > 1 {
				return scheduleCutover(c)
			}
			id, err := oneID(c)
			if err != nil {
				return err
			}
			return withRunner(c, func(r *shadow.Runner) error {
				m, err := r.Cutover(c.Context, id, swapOptionsFrom(c))
				if err != nil {
					return err
				}
				lc := m.State.LastCutover
				fmt.Fprintf(c.App.Writer, "migration %s cut over: %s now serves from %s (%s)\n",
					id, m.Table, m.State.Plan.Forward.Target, lc.Summary())
				if n := len(m.State.Plan.DeferredConstraints); n > 0 {
					fmt.Fprintf(c.App.Writer, "green's %d foreign key(s) check every write (NOT VALID); finalize validates the rows already there\n", n)
				}
				return nil
			})
		},
	})
	register(&cli.Command{
		Name:      "rollback",
		Usage:     "serve blue again after a cutover, losing no write (before a cutover: the same as abort)",
		ArgsUsage: "ID",
		Flags:     swapFlags(),
		Action: withMigration(func(c *cli.Context, r *shadow.Runner, id string) error {
			m, err := r.Rollback(c.Context, id, swapOptionsFrom(c))
			if err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "migration %s is %s: %s serves from blue\n", id, m.Phase, m.Table)
			return nil
		}),
	})
	register(&cli.Command{
		Name:      "finalize",
		Usage:     "after the soak, make green the table itself and drop blue and the sync",
		ArgsUsage: "ID",
		Flags: append(swapFlags(),
			&cli.DurationFlag{Name: "min-soak", Value: time.Hour, Usage: "refuse until this long after the cutover"},
			&cli.BoolFlag{Name: "force", Usage: "finalize before --min-soak has passed"}),
		Action: withMigration(func(c *cli.Context, r *shadow.Runner, id string) error {
			m, err := r.Finalize(c.Context, id, c.Duration("min-soak"), c.Bool("force"), swapOptionsFrom(c))
			if err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "migration %s finalized: %s is the new table; blue and the sync objects are gone\n", id, m.Table)
			return nil
		}),
	})
}

package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/gate"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/urfave/cli/v2"
)

// Exit statuses of `shadowctl wait`.
const (
	waitReached = 0 // the phase was reached
	waitFailed  = 1 // the migration failed, is aborting/aborted, or does not exist
	waitTimeout = 2 // --timeout passed first
	waitUsage   = 3 // bad arguments, or interrupted: no verdict
)

func init() {
	register(&cli.Command{
		Name:  "wait",
		Usage: "block until a migration reaches a phase: exit 0 reached, 1 failed/aborted/missing, 2 timeout, 3 bad usage",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "migration", Usage: "migration id"},
			&cli.StringFlag{Name: "phase", Usage: "phase to reach (ready, cut_over, finalized, ...)"},
			&cli.DurationFlag{Name: "timeout", Value: 30 * time.Minute, Usage: "give up (exit 2) after this long"},
			&cli.DurationFlag{Name: "poll", Value: 2 * time.Second, Usage: "catalog poll interval between NOTIFYs"},
		},
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return cli.Exit("wait: "+err.Error(), waitUsage)
		},
		Action: func(c *cli.Context) error {
			id, phase := c.String("migration"), c.String("phase")
			if id == "" || phase == "" {
				return cli.Exit("wait: --migration and --phase are required", waitUsage)
			}
			if err := gate.ValidatePhase(phase); err != nil {
				return cli.Exit("wait: "+err.Error(), waitUsage)
			}
			return waitForPhase(c, id, phase, c.Duration("timeout"), c.Duration("poll"))
		},
	})
}

// waitForPhase blocks until migration id reaches phase and turns the verdict
// into wait's exit statuses (also used by `start --detach --wait`).
func waitForPhase(c *cli.Context, id, phase string, timeout, poll time.Duration) error {
	cfg, err := connConfig(c)
	if err != nil {
		return cli.Exit(err.Error(), waitUsage)
	}
	dsn := dsnOf(c)
	// The catalog reads wait for locks at most this long.
	cfg.RuntimeParams["lock_timeout"] = "5s"
	v, reason, err := gate.Wait(c.Context, gate.WaitOptions{
		Catalog: catalogOf(c), ID: id, Phase: phase, Timeout: timeout, Poll: poll,
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			defer cancel()
			conn, err := pgx.ConnectConfig(cctx, cfg.Copy())
			return conn, pgsql.RedactError(err, dsn)
		},
		Log: logger(c),
	})
	switch {
	case errors.Is(err, gate.ErrTimeout):
		fmt.Fprintln(c.App.Writer, "TIMEOUT: "+reason)
		return cli.Exit("", waitTimeout)
	case err != nil:
		return cli.Exit("wait: "+err.Error(), waitUsage)
	case v == gate.Reached:
		fmt.Fprintln(c.App.Writer, "ok: "+reason)
		return nil
	default:
		fmt.Fprintln(c.App.Writer, "FAIL: "+reason)
		return cli.Exit("", waitFailed)
	}
}

package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/shadowctl/shadowctl/internal/sqlexec"
	"github.com/shadowctl/shadowctl/lock"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "exec",
		Usage:     "run a migration file statement by statement under the migration lock, each under lock_timeout with retries",
		ArgsUsage: "FILE.sql (or - for standard input)",
		Description: "Each statement runs in its own transaction (a BEGIN ... COMMIT block of the file runs as one);\n" +
			"statements that cannot run in a transaction block (CREATE INDEX CONCURRENTLY, VACUUM, ...) run on\n" +
			"their own. Lock timeouts are retried with backoff and jitter; the INVALID index a failed\n" +
			"CREATE INDEX CONCURRENTLY leaves is dropped before the retry. The first failure stops the run.",
		Flags: []cli.Flag{
			&cli.DurationFlag{Name: "lock-timeout", Value: 2 * time.Second, Usage: "lock_timeout of every statement"},
			&cli.IntFlag{Name: "retries", Value: 10, Usage: "retries of a statement after lock timeouts, deadlocks, serialization failures"},
			&cli.BoolFlag{Name: "strict", Usage: "refuse a DROP COLUMN of a column that pg_stat_statements shows in use"},
			&cli.DurationFlag{Name: "window", Value: 24 * time.Hour, Usage: "pg_stat_statements history the contract guard wants (it warns when stats were reset more recently)"},
			&cli.StringFlag{Name: "key", Value: "migrations", Usage: "name of the migration advisory lock (same as `shadowctl lock --key`)"},
			&cli.DurationFlag{Name: "lock-wait", Value: time.Minute, Usage: "how long to wait for the migration lock"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return cli.Exit("exec: want exactly one FILE.sql (or -)", 1)
			}
			path := c.Args().First()
			var src []byte
			var err error
			if path == "-" {
				src, err = io.ReadAll(os.Stdin)
			} else {
				src, err = os.ReadFile(path)
			}
			if err != nil {
				return fmt.Errorf("exec: %w", err)
			}
			log := logger(c).With().Str("file", path).Logger()
			cfg, err := connConfig(c)
			if err != nil {
				return err
			}
			l, err := lock.Acquire(c.Context, cfg, c.String("key"), c.Duration("lock-wait"))
			if err != nil {
				return fmt.Errorf("exec: migration lock %q: %w", c.String("key"), err)
			}
			defer l.Release(context.WithoutCancel(c.Context))
			ctx, cancel := context.WithCancelCause(c.Context)
			defer cancel(nil)
			go func() {
				select {
				case <-l.Lost():
					cancel(fmt.Errorf("migration lock: %w", l.Err()))
				case <-ctx.Done():
				}
			}()
			conn, err := connect(c)
			if err != nil {
				return err
			}
			defer conn.Close(context.WithoutCancel(c.Context))
			res, err := sqlexec.Run(ctx, conn, string(src), sqlexec.Options{
				LockTimeout: c.Duration("lock-timeout"), Retries: c.Int("retries"),
				Strict: c.Bool("strict"), Window: c.Duration("window"), Log: log,
			})
			if err != nil {
				if cause := context.Cause(ctx); cause != nil && cause != ctx.Err() {
					return fmt.Errorf("exec %s: %w (after %d statements)", path, cause, res.Statements)
				}
				return fmt.Errorf("exec %s: %w", path, err)
			}
			fmt.Fprintf(c.App.Writer, "exec %s: %d statements ran (%d retries)\n", path, res.Statements, res.Retries)
			return nil
		},
	})
}

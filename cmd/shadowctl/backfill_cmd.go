package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "backfill",
		Usage:     "batched UPDATE of a live table (expand/contract), checkpointed and resumable",
		UsageText: `shadowctl backfill --table orders --set "customer_email = customers.email" --from customers --where "orders.customer_id = customers.id" [--only-null customer_email]`,
		Description: "Rows are visited in key order (primary key, or a unique index on NOT NULL columns) in short\n" +
			"transactions under lock_timeout. --set, --from and --where are SQL, used as written. A rerun with\n" +
			"the same --table/--set/--from/--where/--only-null resumes from the checkpoint in the catalog.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "table", Usage: "[schema.]table to update"},
			&cli.StringFlag{Name: "set", Usage: "SQL SET list, e.g. \"customer_email = customers.email\""},
			&cli.StringFlag{Name: "from", Usage: "SQL FROM list joined to the table, e.g. customers"},
			&cli.StringFlag{Name: "where", Usage: "SQL predicate, e.g. \"orders.customer_id = customers.id\""},
			&cli.StringFlag{Name: "only-null", Usage: "only rows where this column IS NULL (re-checked under the row lock: never overwrites a value written meanwhile)"},
			&cli.IntFlag{Name: "batch-size", Value: 5000, Usage: "largest batch; the size adapts to --target-batch-time below it"},
			&cli.DurationFlag{Name: "target-batch-time", Value: 200 * time.Millisecond, Usage: "how long one batch should take"},
			&cli.Float64Flag{Name: "max-rows-per-second", Usage: "throttle: rows changed per second (0: no limit)"},
			&cli.DurationFlag{Name: "lock-timeout", Value: time.Second, Usage: "lock_timeout of each batch"},
			&cli.IntFlag{Name: "retries", Value: 10, Usage: "retries of a batch after lock timeouts, deadlocks, serialization failures"},
			&cli.DurationFlag{Name: "progress-every", Value: 10 * time.Second, Usage: "how often to log progress"},
			&cli.BoolFlag{Name: "restart", Usage: "forget this backfill's checkpoint and start from the first key"},
		},
		Action: func(c *cli.Context) error {
			if c.String("table") == "" || c.String("set") == "" {
				return cli.Exit("backfill: --table and --set are required", 1)
			}
			log := logger(c)
			conn, err := connect(c)
			if err != nil {
				return err
			}
			defer conn.Close(c.Context)
			cat := catalogOf(c)
			if err := cat.Check(c.Context, conn); err != nil {
				return err
			}
			res, err := backfill.RunUpdate(c.Context, conn, cat, backfill.Update{
				Table: c.String("table"), Set: c.String("set"), From: c.String("from"),
				Where: c.String("where"), OnlyNull: c.String("only-null"),
			}, backfill.UpdateOptions{
				MaxBatch: c.Int("batch-size"), TargetBatchTime: c.Duration("target-batch-time"),
				MaxRowsPerSecond: c.Float64("max-rows-per-second"), LockTimeout: c.Duration("lock-timeout"),
				Retries: c.Int("retries"), ProgressEvery: c.Duration("progress-every"), Restart: c.Bool("restart"),
				Log: log,
			})
			if err != nil {
				if errors.Is(err, c.Context.Err()) && c.Context.Err() != nil {
					return fmt.Errorf("interrupted; %d rows changed this run, rerun the same command to resume: %w", res.RowsThisRun, err)
				}
				return err
			}
			switch {
			case res.AlreadyDone:
				fmt.Fprintf(c.App.Writer, "backfill %s on %s was already done: %d rows changed (--restart to run it again)\n",
					res.ID, res.Table, res.RowsChanged)
			default:
				resumed := ""
				if res.Resumed {
					resumed = ", resumed from a checkpoint"
				}
				fmt.Fprintf(c.App.Writer, "backfill %s on %s done: %d rows changed (%d this run%s) in %s\n",
					res.ID, res.Table, res.RowsChanged, res.RowsThisRun, resumed, res.Took.Round(time.Millisecond))
			}
			return nil
		},
	})
}

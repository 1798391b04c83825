package main

import (
	"errors"
	"os"

	"github.com/mattn/go-isatty"
	"github.com/shadowctl/shadowctl/internal/demo"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:  "demo",
		Usage: "start a throwaway PostgreSQL, 1M orders under live load, and run start → cutover → rollback → cutover → finalize",
		Flags: []cli.Flag{
			&cli.Int64Flag{Name: "rows", Value: 1_000_000, Usage: "orders to seed"},
			&cli.IntFlag{Name: "customers", Value: 20_000, Usage: "customers to seed"},
			&cli.IntFlag{Name: "clients", Value: 4, Usage: "load clients"},
			&cli.DurationFlag{Name: "soak", Value: demo.DefaultSoak, Usage: "how long the load runs on each side after a swap"},
			&cli.IntFlag{Name: "batch-size", Usage: "largest copy batch", DefaultText: "as shadowctl start"},
			&cli.IntFlag{Name: "workers", Usage: "parallel copy workers", DefaultText: "as shadowctl start"},
			&cli.Float64Flag{Name: "load-share", Value: 1, Usage: "while the load runs: the share of one worker's time the copy uses (shadowctl start's default is 0.2 with trigger sync; the demo's 1 keeps it short)"},
			&cli.BoolFlag{Name: "keep", Usage: "leave PostgreSQL running after the report (until Ctrl-C) and print its DSN"},
		},
		Action: func(c *cli.Context) error {
			log := logger(c)
			if !c.IsSet("log-level") && os.Getenv("SHADOWCTL_LOG_LEVEL") == "" {
				log = newLogger(c.App.ErrWriter, "warn", c.String("log-format"))
			}
			live := false
			if f, ok := c.App.Writer.(*os.File); ok {
				live = isatty.IsTerminal(f.Fd())
			}
			_, err := demo.Run(c.Context, demo.Config{
				Rows: c.Int64("rows"), Customers: c.Int("customers"), Clients: c.Int("clients"), Soak: c.Duration("soak"),
				BatchSize: c.Int("batch-size"), Workers: c.Int("workers"), LoadShare: c.Float64("load-share"),
				Keep: c.Bool("keep"), Out: c.App.Writer, Live: live, Log: log,
			})
			if err != nil && c.Context.Err() != nil {
				return cli.Exit("demo interrupted; its throwaway PostgreSQL was stopped and removed", 130)
			}
			if errors.Is(err, demo.ErrFailed) {
				return cli.Exit(err.Error(), 1)
			}
			return err
		},
	})
}

package main

import (
	"fmt"
	"time"

	"github.com/shadowctl/shadowctl/internal/gate"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:  "check",
		Usage: "deploy gate: exit 0 when the schema or migration is as asked, 1 (with a one-line reason) otherwise",
		UsageText: "shadowctl check --column orders.customer_email [--type text] [--not-null]\n" +
			"shadowctl check --no-column orders.customer_name\n" +
			"shadowctl check --index orders_customer_email_idx [--valid]\n" +
			"shadowctl check --migration ID --phase ready|cut_over|finalized",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "column", Usage: "[schema.]table.column that must exist"},
			&cli.StringFlag{Name: "type", Usage: "with --column: its type (a modifier such as varchar(80) must match too)"},
			&cli.BoolFlag{Name: "not-null", Usage: "with --column: it must be NOT NULL"},
			&cli.StringFlag{Name: "no-column", Usage: "[schema.]table.column that must not exist"},
			&cli.StringFlag{Name: "index", Usage: "[schema.]index that must exist"},
			&cli.BoolFlag{Name: "valid", Usage: "with --index: it must be valid (not a failed or unfinished concurrent build)"},
			&cli.StringFlag{Name: "migration", Usage: "migration id"},
			&cli.StringFlag{Name: "phase", Usage: "with --migration: the phase it must have reached"},
		},
		Action: func(c *cli.Context) error {
			fails := func(msg string) error {
				fmt.Fprintln(c.App.Writer, "FAIL: "+msg)
				return cli.Exit("", 1)
			}
			switch {
			case (c.IsSet("type") || c.Bool("not-null")) && c.String("column") == "":
				return fails("--type and --not-null go with --column")
			case c.Bool("valid") && c.String("index") == "":
				return fails("--valid goes with --index")
			case (c.String("migration") == "") != (c.String("phase") == ""):
				return fails("--migration and --phase go together")
			case c.String("column") == "" && c.String("no-column") == "" && c.String("index") == "" && c.String("migration") == "":
				return fails("nothing to check: give --column, --no-column, --index or --migration")
			}
			if c.String("phase") != "" {
				if err := gate.ValidatePhase(c.String("phase")); err != nil {
					return fails(err.Error())
				}
			}
			conn, err := connect(c)
			if err != nil {
				return fails(redactAll(err.Error(), nil))
			}
			defer conn.Close(c.Context)
			// The gate only reads, but a read can queue behind DDL.
			if err := pgsql.SetLockTimeout(c.Context, conn, 5*time.Second); err != nil {
				return fails(err.Error())
			}
			var results []gate.Result
			add := func(r gate.Result, err error) error {
				if err != nil {
					return err
				}
				results = append(results, r)
				return nil
			}
			if v := c.String("column"); v != "" {
				if err := add(gate.CheckColumn(c.Context, conn, gate.ColumnCheck{Column: v, Type: c.String("type"), NotNull: c.Bool("not-null")})); err != nil {
					return fails(err.Error())
				}
			}
			if v := c.String("no-column"); v != "" {
				if err := add(gate.CheckNoColumn(c.Context, conn, v)); err != nil {
					return fails(err.Error())
				}
			}
			if v := c.String("index"); v != "" {
				if err := add(gate.CheckIndex(c.Context, conn, v, c.Bool("valid"))); err != nil {
					return fails(err.Error())
				}
			}
			if v := c.String("migration"); v != "" {
				r, _, err := gate.CheckMigration(c.Context, conn, catalogOf(c), v, c.String("phase"))
				if err := add(r, err); err != nil {
					return fails(err.Error())
				}
			}
			ok := true
			for _, r := range results {
				if r.OK {
					fmt.Fprintln(c.App.Writer, "ok: "+r.Reason)
				} else {
					ok = false
					fmt.Fprintln(c.App.Writer, "FAIL: "+r.Reason)
				}
			}
			if !ok {
				return cli.Exit("", 1)
			}
			return nil
		},
	})
}

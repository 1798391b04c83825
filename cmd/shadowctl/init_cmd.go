package main

import (
	"fmt"

	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:  "init",
		Usage: "create or upgrade the catalog schema (idempotent, safe to run concurrently)",
		Action: func(c *cli.Context) error {
			conn, err := connect(c)
			if err != nil {
				return err
			}
			defer conn.Close(c.Context)
			cat := catalogOf(c)
			from, to, err := cat.Init(c.Context, conn)
			if err != nil {
				return err
			}
			if from == to {
				fmt.Fprintf(c.App.Writer, "catalog %s is up to date (version %d)\n", cat.Schema, to)
			} else {
				fmt.Fprintf(c.App.Writer, "catalog %s upgraded from version %d to %d\n", cat.Schema, from, to)
			}
			return nil
		},
	})
}

// Command shadowctl changes the structure of live PostgreSQL tables without
// downtime (blue-green shadow tables), runs batched backfills and migration
// files under an advisory lock, and gives CI a gate to wait on.
//
// This package is thin on purpose: flags in, calls into the packages, output
// out. Each command lives in its own file and registers itself in init().
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"
)

// commands is filled by each command file's init().
var commands []*cli.Command

func register(c *cli.Command) { commands = append(commands, c) }

func newApp() *cli.App {
	return &cli.App{
		Name:                 "shadowctl",
		Usage:                "zero-downtime schema changes for live PostgreSQL tables",
		Flags:                globalFlags(),
		Commands:             commands,
		EnableBashCompletion: true,
		ExitErrHandler:       func(*cli.Context, error) {}, // main decides the exit status
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args, os.Stdout, os.Stderr))
}

// run executes one invocation and returns its exit status. Errors are printed
// with any DSN password removed.
func run(ctx context.Context, args []string, stdout, stderr *os.File) int {
	app := newApp()
	app.Writer, app.ErrWriter = stdout, stderr
	err := app.RunContext(ctx, interspersed(app, args))
	if err == nil {
		return 0
	}
	var ec cli.ExitCoder
	code := 1
	if errors.As(err, &ec) {
		code = ec.ExitCode()
	}
	if msg := redactAll(err.Error(), args); msg != "" {
		fmt.Fprintln(stderr, "shadowctl: "+msg)
	}
	return code
}

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/lock"
	"github.com/urfave/cli/v2"
)

// Exit statuses of `shadowctl lock` (besides the command's own).
const (
	exitLockUsage       = 64  // EX_USAGE: no command, bad flag
	exitLockUnavailable = 69  // EX_UNAVAILABLE: could not connect, or a transaction pooler is in the way
	exitLockHeld        = 75  // EX_TEMPFAIL: someone else held the lock for the whole --wait
	exitLockLost        = 76  // the lock's connection died while the command ran
	exitCannotExec      = 126 // the command exists but could not be started
	exitNotFound        = 127 // the command was not found
)

const lockDescription = `Runs COMMAND while holding a PostgreSQL session-level advisory lock named
--key (default "migrations"; key = first 8 bytes of SHA-256("shadowctl:"+NAME),
see the lock package), so that migration tools started from several places
(CI jobs, deploy hooks, replicas) never run at the same time on one database.

The lock is held on its own connection (application_name "shadowctl lock NAME")
from before COMMAND starts until after it exits. It needs a direct session to
PostgreSQL or a session-mode pool, not a transaction-pooling proxy (pgbouncer
pool_mode=transaction); the obvious case of that is detected and refused.

If the lock is held, shadowctl waits up to --wait (0: not at all), then exits
75 naming the holder (pid, application, client address, since when).

SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to COMMAND, and shadowctl keeps
the lock until COMMAND exits. When shadowctl runs in the foreground of a
terminal, COMMAND shares its process group and receives Ctrl-C (SIGINT/SIGQUIT)
from the terminal itself, so those are not forwarded a second time. On Linux,
if shadowctl itself dies (even by SIGKILL), COMMAND gets SIGTERM: the lock died
with shadowctl's connection.

If the lock's connection dies while COMMAND runs (server restart, the backend
terminated, network loss), the mutual exclusion is gone: shadowctl says so on
stderr, sends SIGTERM to COMMAND, waits for it and exits 76.

Exit status:
  COMMAND's own status; 128+N if it was killed by signal N
  64   usage error (no COMMAND, bad flag)
  69   could not connect or take the lock (e.g. transaction pooler)
  75   the lock stayed held by someone else for the whole --wait
  76   the lock was lost while COMMAND ran (COMMAND was sent SIGTERM)
  126  COMMAND could not be executed; 127 COMMAND not found
  128+N  interrupted by signal N while waiting for the lock (COMMAND never ran)

Example:
  shadowctl --dsn "$DATABASE_URL" lock --key migrations --wait 10m -- flyway migrate`

func init() {
	register(&cli.Command{
		Name:        "lock",
		Usage:       "run a command (e.g. another migration tool) while holding a PostgreSQL advisory lock",
		ArgsUsage:   "-- COMMAND [ARGS...]",
		Description: lockDescription,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "key", Value: "migrations", Usage: "lock `NAME`; runs with the same name exclude each other (per database)"},
			&cli.DurationFlag{Name: "wait", Value: 30 * time.Second, Usage: "how long to wait for a held lock before exiting 75 (0: fail at once)"},
		},
		Action: lockAction,
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return cli.Exit(fmt.Errorf("lock: %w", err), exitLockUsage)
		},
	})
}

type acquireResult struct {
	l   *lock.Lock
	err error
}

type childResult struct {
	state *os.ProcessState
	err   error
}

func lockAction(c *cli.Context) error {
	args := c.Args().Slice()
	if len(args) == 0 {
		return cli.Exit("lock: no command given; usage: shadowctl lock [--key NAME] [--wait 30s] -- COMMAND [ARGS...]", exitLockUsage)
	}
	key, wait := c.String("key"), c.Duration("wait")
	if key == "" {
		return cli.Exit("lock: --key must not be empty", exitLockUsage)
	}
	if wait < 0 {
		return cli.Exit("lock: --wait must not be negative", exitLockUsage)
	}
	log := logger(c).With().Str("cmd", "lock").Logger()
	cfg, err := connConfig(c)
	if err != nil {
		return cli.Exit(err, exitLockUsage)
	}
	if cfg.RuntimeParams["application_name"] == "shadowctl" { // the default: say what this session is for
		cfg.RuntimeParams["application_name"] = "shadowctl lock " + key
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 30 * time.Second
	}

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	defer signal.Stop(sigs)

	// The lock lives as long as holdCtx: not c.Context, which ends on the
	// first SIGINT/SIGTERM while the command may still be cleaning up.
	holdCtx, endHold := context.WithCancel(context.WithoutCancel(c.Context))
	defer endHold()
	acquired := make(chan acquireResult, 1)
	go func() {
		l, err := lock.AcquireWith(holdCtx, cfg, key, lock.Options{Wait: wait, Logger: log})
		acquired <- acquireResult{l, err}
	}()
	var l *lock.Lock
	select {
	case r := <-acquired:
		if r.err != nil {
			var held *lock.HeldError
			switch {
			case errors.As(r.err, &held):
				return cli.Exit(fmt.Errorf("lock: not acquired: %w (exit %d)", r.err, exitLockHeld), exitLockHeld)
			default:
				return cli.Exit(fmt.Errorf("lock: %w", r.err), exitLockUnavailable)
			}
		}
		l = r.l
	case s := <-sigs:
		endHold()
		if r := <-acquired; r.l != nil {
			releaseLock(log, r.l)
		}
		return cli.Exit(fmt.Sprintf("lock: interrupted by %s while waiting for lock %q; the command did not run", s, key), 128+signum(s))
	}
	defer releaseLock(log, l) // idempotent; normally released below

	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, c.App.Writer, c.App.ErrWriter
	started := make(chan error, 1)
	done := make(chan childResult, 1)
	go func() {
		// The parent-death signal is tied to the thread that forks the child:
		// keep this goroutine on its thread for the child's whole life.
		runtime.LockOSThread()
		setParentDeathSignal(cmd)
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		err := cmd.Wait()
		done <- childResult{cmd.ProcessState, err}
	}()
	if err := <-started; err != nil {
		code := exitCannotExec
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
			code = exitNotFound
		}
		return cli.Exit(fmt.Sprintf("lock: cannot run %q: %v", args[0], err), code)
	}
	log.Info().Str("lock", key).Int32("backend_pid", l.BackendPID()).Int("child_pid", cmd.Process.Pid).
		Msg("lock acquired; running the command")

	lost := l.Lost()
	lostWhileRunning := false
	for {
		select {
		case s := <-sigs:
			if fromKeyboard(s) {
				log.Debug().Str("signal", s.String()).Msg("signal from the terminal reaches the command directly; not forwarding")
				continue
			}
			log.Info().Str("signal", s.String()).Int("child_pid", cmd.Process.Pid).Msg("forwarding signal to the command")
			_ = cmd.Process.Signal(s)
		case <-lost:
			lost, lostWhileRunning = nil, true
			log.Error().Err(l.Err()).Str("lock", key).Int("child_pid", cmd.Process.Pid).
				Msg("LOCK LOST while the command runs: mutual exclusion is gone; sending SIGTERM to the command")
			_ = cmd.Process.Signal(syscall.SIGTERM)
		case r := <-done:
			releaseLock(log, l)
			code := exitStatus(r.state)
			if lostWhileRunning {
				return cli.Exit(fmt.Sprintf("lock: lock %q was lost while the command ran (%v); the command was sent SIGTERM and exited with status %d",
					key, l.Err(), code), exitLockLost)
			}
			if code == 0 {
				return nil
			}
			return cli.Exit("", code)
		}
	}
}

func releaseLock(log zerolog.Logger, l *lock.Lock) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.Release(ctx); err != nil {
		log.Warn().Err(err).Msg("release lock")
	}
}

// exitStatus is the child's exit status, 128+N for a death by signal N.
func exitStatus(st *os.ProcessState) int {
	if st == nil {
		return 1
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return st.ExitCode()
}

func signum(s os.Signal) int {
	if n, ok := s.(syscall.Signal); ok {
		return int(n)
	}
	return 1
}

package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/shadowctl/shadowctl/shadow"
)

// hookEventsOf maps a phase change (the "to" phase, and for ready the
// verification that led there) to the hook events it fires, in order.
func hookEventsOf(from, to string) []string {
	switch shadow.Phase(to) {
	case shadow.Preparing:
		if from == string(shadow.Pending) {
			return []string{"started"}
		}
	case shadow.Verifying:
		return []string{"copy-done"}
	case shadow.Ready:
		if from == string(shadow.Verifying) {
			return []string{"verified", "ready"}
		}
		return []string{"ready"}
	case shadow.CutOver:
		if from == string(shadow.CuttingOver) {
			return []string{"cut-over"}
		}
	case shadow.RolledBack:
		return []string{"rolled-back"}
	case shadow.Finalized:
		return []string{"finalized"}
	case shadow.Failed:
		return []string{"failed"}
	}
	return nil
}

// followHooks fires hooks for the phase changes of migration id while fn
// runs (checking every poll interval) and once more after it, so hooks run
// soon after each change, in order. The caller holds the claim.
func (d *Daemon) followHooks(ctx context.Context, id string, fn func()) {
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(d.cfg.Poll)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				d.fireHooks(ctx, id)
			}
		}
	}()
	fn()
	close(stop)
	<-done
	d.fireHooks(ctx, id)
}

// hooksPending says whether a migration has hooks whose phase changes have
// not been handled yet (also changes made by CLI commands: cutover,
// rollback, finalize, abort).
func (d *Daemon) hooksPending(ctx context.Context, m *shadow.Migration) bool {
	if len(m.Request.Hooks) == 0 {
		return false
	}
	d.mu.Lock()
	backoff := time.Now().Before(d.backoff[m.ID])
	d.mu.Unlock()
	if backoff {
		return false
	}
	done, last, err := d.r.Store.HookProgress(ctx, m.ID)
	return err == nil && last > done
}

// fireHooks runs the hooks of the phase changes recorded after the
// migration's hook cursor (hooks_done in the catalog), in order, advancing
// the cursor after each: a hook runs once per change, whichever daemon
// drives (at least once if a daemon dies between a hook and its record).
// The caller holds the claim, so no other daemon runs them meanwhile. When
// ctx ends (SIGTERM, lost claim) a running hook is killed and not recorded:
// the next driver runs it again.
func (d *Daemon) fireHooks(ctx context.Context, id string) {
	d.hookMu.Lock()
	defer d.hookMu.Unlock()
	if ctx.Err() != nil {
		return
	}
	done, _, err := d.r.Store.HookProgress(ctx, id)
	if err != nil {
		d.log.Warn().Err(err).Str("migration", id).Msg("hooks: could not read progress")
		return
	}
	evs, err := d.r.Store.EventsSince(ctx, id, done)
	if err != nil {
		d.log.Warn().Err(err).Str("migration", id).Msg("hooks: could not read events")
		return
	}
	// The migration is read after its events, so that a hook sees the
	// figures of its phase change or later ones: read first, a copy-done
	// hook could get the row count of the copy's start.
	m, err := d.r.Store.Get(ctx, d.r.Pool, id)
	if err != nil || len(m.Request.Hooks) == 0 {
		return
	}
	for _, e := range evs {
		if e.Kind == "phase" {
			var ch struct{ From, To string }
			if json.Unmarshal(e.Data, &ch) == nil {
				for _, ev := range hookEventsOf(ch.From, ch.To) {
					mm := *m
					mm.Phase = shadow.Phase(ch.To)
					code, out, err := d.runHook(ctx, &mm, ev)
					if ctx.Err() != nil {
						return
					}
					if err != nil || code != 0 {
						d.log.Warn().Err(err).Int("exit_code", code).Str("hook", ev).Str("output", out).Str("migration", id).Msg("hook failed")
					}
				}
			}
		}
		if err := d.r.Store.SetHooksDone(ctx, id, e.ID); err != nil {
			d.log.Warn().Err(err).Str("migration", id).Msg("hooks: could not record progress")
			return
		}
	}
}

// HookEnv is the environment a hook command gets (besides the daemon's).
func HookEnv(m *shadow.Migration, event string) []string {
	return []string{
		"SHADOWCTL_MIGRATION_ID=" + m.ID,
		"SHADOWCTL_TABLE=" + m.Table.String(),
		"SHADOWCTL_PHASE=" + string(m.Phase),
		"SHADOWCTL_EVENT=" + event,
		"SHADOWCTL_ROWS_COPIED=" + strconv.FormatInt(m.RowsCopied, 10),
		"SHADOWCTL_ROWS_ESTIMATED=" + strconv.FormatInt(m.RowsEstimated, 10),
		"SHADOWCTL_ERROR=" + m.Error,
	}
}

// secretEnv are the daemon's variables that may hold a database password;
// hooks do not inherit them (they connect with their own credentials).
var secretEnv = []string{"SHADOWCTL_DSN", "DATABASE_URL", "PGPASSWORD"}

func hookBaseEnv() []string {
	var out []string
next:
	for _, kv := range os.Environ() {
		for _, s := range secretEnv {
			if strings.HasPrefix(kv, s+"=") {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}

// runHook runs the migration's hook for event, if any, with `sh -c`, and
// records it in the audit log. It returns the exit code and the output's
// last line.
func (d *Daemon) runHook(ctx context.Context, m *shadow.Migration, event string) (int, string, error) {
	cmdline := m.Request.Hooks[event]
	if cmdline == "" {
		return 0, "", nil
	}
	hctx, cancel := context.WithTimeout(ctx, d.cfg.HookTimeout)
	defer cancel()
	cmd := exec.CommandContext(hctx, "/bin/sh", "-c", cmdline)
	cmd.Env = append(hookBaseEnv(), HookEnv(m, event)...)
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code, err = ee.ExitCode(), nil
	} else if err != nil {
		code = -1
		err = fmt.Errorf("hook %s: %w", event, err)
	}
	last := lastLine(out.String())
	d.metrics.hooks.WithLabelValues(event, strconv.FormatBool(code == 0 && err == nil)).Inc()
	_ = d.r.Store.EventBy(context.WithoutCancel(ctx), d.r.Pool, m.ID, d.cfg.Identity, "hook",
		fmt.Sprintf("hook %s exited %d after %s", event, code, time.Since(start).Round(time.Millisecond)),
		map[string]any{"event": event, "exit_code": code, "output": last})
	return code, last, err
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

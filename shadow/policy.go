package shadow

import (
	"fmt"
	"strings"
	"time"

	"github.com/shadowctl/shadowctl/internal/window"
)

// Cutover policies.
const (
	CutoverManual = "manual"
	CutoverAuto   = "auto"
	CutoverWindow = "window"
)

// DefaultVerifyEvery is how often the daemon verifies after a cutover.
const DefaultVerifyEvery = time.Minute

// HookEvents are the lifecycle events a hook can run on (docs/daemon.md).
var HookEvents = []string{"started", "copy-done", "verified", "ready", "before-cutover", "cut-over", "rolled-back", "finalized", "failed"}

// normalizeDaemon checks the daemon's fields of a request.
func (r *Request) normalizeDaemon() error {
	if r.CutoverPolicy == "" {
		r.CutoverPolicy = CutoverManual
		if r.Window != "" {
			r.CutoverPolicy = CutoverWindow
		} else if r.CutoverAt != nil {
			r.CutoverPolicy = CutoverAuto
		}
	}
	switch r.CutoverPolicy {
	case CutoverManual, CutoverAuto:
		if r.Window != "" {
			return fmt.Errorf("%w: --window needs --cutover window (not %s)", ErrBadRequest, r.CutoverPolicy)
		}
	case CutoverWindow:
		if r.Window == "" {
			return fmt.Errorf("%w: --cutover window needs --window SPEC", ErrBadRequest)
		}
		if _, err := window.Parse(r.Window); err != nil {
			return fmt.Errorf("%w: %w", ErrBadRequest, err)
		}
	default:
		return fmt.Errorf("%w: --cutover must be manual, auto or window, not %q", ErrBadRequest, r.CutoverPolicy)
	}
	for ev := range r.Hooks {
		if !isHookEvent(ev) {
			return fmt.Errorf("%w: --hook %s: unknown event (one of %s)", ErrBadRequest, ev, strings.Join(HookEvents, ", "))
		}
	}
	if r.MaxReplicaLag < 0 || r.VerifyEvery < 0 {
		return fmt.Errorf("%w: durations must not be negative", ErrBadRequest)
	}
	return nil
}

func isHookEvent(ev string) bool {
	for _, e := range HookEvents {
		if e == ev {
			return true
		}
	}
	return false
}

// ParseHooks reads EVENT=COMMAND pairs of --hook.
func ParseHooks(items []string) (map[string]string, error) {
	out := map[string]string{}
	for _, it := range items {
		ev, cmd, ok := strings.Cut(it, "=")
		ev, cmd = strings.TrimSpace(ev), strings.TrimSpace(cmd)
		if !ok || cmd == "" || !isHookEvent(ev) {
			return nil, fmt.Errorf("%w: --hook %q: write EVENT=COMMAND, EVENT one of %s", ErrBadRequest, it, strings.Join(HookEvents, ", "))
		}
		if _, dup := out[ev]; dup {
			return nil, fmt.Errorf("%w: --hook gives event %s twice", ErrBadRequest, ev)
		}
		out[ev] = cmd
	}
	return out, nil
}

// CutoverDue says whether a ready (or rolled back) migration's policy wants
// a cutover at now, and until when the attempt may run (zero: no limit
// from the policy). For a window policy, due is true only inside a window.
func CutoverDue(m *Migration, now time.Time) (due bool, until time.Time, why string) {
	if m.Paused {
		return false, time.Time{}, "paused"
	}
	if m.CutoverHeld {
		return false, time.Time{}, "postponed"
	}
	req := m.Request
	switch req.CutoverPolicy {
	case CutoverAuto:
		if req.CutoverAt != nil && now.Before(*req.CutoverAt) {
			return false, time.Time{}, "scheduled at " + req.CutoverAt.UTC().Format(time.RFC3339)
		}
		return true, time.Time{}, "auto"
	case CutoverWindow:
		w, err := window.Parse(req.Window)
		if err != nil {
			return false, time.Time{}, err.Error()
		}
		start, end, open := w.Next(now)
		if !open {
			return false, time.Time{}, "next window at " + start.Format(time.RFC3339)
		}
		return true, end, "inside window " + w.String()
	}
	return false, time.Time{}, "manual"
}

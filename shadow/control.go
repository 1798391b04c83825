package shadow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/window"
)

// ErrBadSetting means a `set` key or value is not accepted.
var ErrBadSetting = errors.New("bad setting")

// LocalActor names the operating-system user and host of this process, for
// the audit log (the database role is added by the catalog write).
func LocalActor() string {
	name := "unknown"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return name + "@" + host
}

// EventBy appends to the audit log with an explicit actor: the database role
// (current_user) and who is behind it (OS user@host, or a daemon's identity).
func (s *Store) EventBy(ctx context.Context, q pgsql.Querier, id, actor, kind, msg string, data any) error {
	var b []byte
	if data != nil {
		var err error
		if b, err = json.Marshal(data); err != nil {
			return err
		}
	}
	if _, err := q.Exec(ctx, `INSERT INTO `+s.Cat.T("events")+` (migration_id, actor, kind, message, data)
		VALUES ($1, current_user || ' (' || $2 || ')', $3, $4, $5)`, id, actor, kind, msg, b); err != nil {
		return fmt.Errorf("migration %s: record event: %w", id, err)
	}
	return nil
}

// Notify announces a change of migration id to daemons.
func (s *Store) Notify(ctx context.Context, q pgsql.Querier, id string) error {
	_, err := q.Exec(ctx, `SELECT pg_notify($1, $2)`, NotifyChannel, id)
	return err
}

// control runs one operator command: an UPDATE of the migration (which must
// match a row, else the migration is in the wrong phase), the event, and a
// NOTIFY, in one transaction.
func (s *Store) control(ctx context.Context, id, actor, kind, msg string, data any, update string, args ...any) error {
	return pgx.BeginFunc(ctx, s.Pool, func(tx pgx.Tx) error {
		if err := pgsql.SetLocalLockTimeout(ctx, tx, catalogLockTimeout); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `UPDATE `+s.Cat.T("migrations")+` SET `+update+`, updated_at = now() WHERE id = $1 AND `+
			`phase NOT IN ('aborted', 'finalized', 'aborting', 'finalizing')`, append([]any{id}, args...)...)
		if err != nil {
			return fmt.Errorf("migration %s: %s: %w", id, kind, err)
		}
		if tag.RowsAffected() == 0 {
			cur, err := s.Get(ctx, tx, id)
			if err != nil {
				return err
			}
			return fmt.Errorf("migration %s is %s: %w", id, cur.Phase, ErrWrongPhase)
		}
		if err := s.EventBy(ctx, tx, id, actor, kind, msg, data); err != nil {
			return err
		}
		return s.Notify(ctx, tx, id)
	})
}

// Pause stops the copy and the daemon's work on a migration at its next
// checkpoint, until Resume.
func (s *Store) Pause(ctx context.Context, id, actor string) error {
	return s.control(ctx, id, actor, "pause", "paused", nil, "paused = true")
}

// Resume lifts a pause and a postponed cutover.
func (s *Store) Resume(ctx context.Context, id, actor string) error {
	return s.control(ctx, id, actor, "resume", "resumed (pause and postponed cutover lifted)", nil, "paused = false, cutover_held = false")
}

// Postpone holds an automatic or scheduled cutover until Resume or a new
// cutover policy releases it.
func (s *Store) Postpone(ctx context.Context, id, actor string) error {
	return s.control(ctx, id, actor, "postpone", "automatic cutover postponed until resume", nil, "cutover_held = true")
}

// Settings are the live-tunable copy settings of `shadowctl set`.
var Settings = []string{"batch_size", "max_rows_per_second", "workers"}

// ParseSettings reads key=value pairs of `shadowctl set`.
func ParseSettings(items []string) (map[string]int, error) {
	out := map[string]int{}
	for _, it := range items {
		k, v, ok := strings.Cut(it, "=")
		k = strings.ReplaceAll(strings.TrimSpace(k), "-", "_")
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if !ok || err != nil {
			return nil, fmt.Errorf("%w: %q: write key=integer (keys: %s)", ErrBadSetting, it, strings.Join(Settings, ", "))
		}
		switch k {
		case "batch_size", "workers":
			if n < 1 {
				return nil, fmt.Errorf("%w: %s must be at least 1", ErrBadSetting, k)
			}
		case "max_rows_per_second":
			if n < 0 {
				return nil, fmt.Errorf("%w: max_rows_per_second must be 0 (no cap) or more", ErrBadSetting)
			}
		default:
			return nil, fmt.Errorf("%w: unknown key %q (one of %s)", ErrBadSetting, k, strings.Join(Settings, ", "))
		}
		out[k] = n
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: nothing to set (keys: %s)", ErrBadSetting, strings.Join(Settings, ", "))
	}
	return out, nil
}

// Set changes copy settings; a running copy applies them before its next
// batch (workers: up to the copy's ranges, four per worker it started with).
func (s *Store) Set(ctx context.Context, id, actor string, settings map[string]int) error {
	b, err := json.Marshal(settings)
	if err != nil {
		return err
	}
	keys := make([]string, 0, len(settings))
	for k, v := range settings {
		keys = append(keys, fmt.Sprintf("%s=%d", k, v))
	}
	sort.Strings(keys)
	return s.control(ctx, id, actor, "set", "set "+strings.Join(keys, " "), settings, "spec = spec || $2::jsonb", string(b))
}

// SetCutoverPolicy records a cutover policy for the daemon (auto, optionally
// not before at; or window) and releases a postponed cutover.
func (s *Store) SetCutoverPolicy(ctx context.Context, id, actor, policy, win string, at *time.Time) error {
	patch := map[string]any{"cutover_policy": policy, "window": nil, "cutover_at": nil}
	msg := "cutover policy: " + policy
	switch policy {
	case CutoverAuto:
		if at != nil {
			patch["cutover_at"] = at.UTC()
			msg += " at " + at.UTC().Format(time.RFC3339)
		}
	case CutoverWindow:
		if _, err := window.Parse(win); err != nil {
			return fmt.Errorf("%w: %w", ErrBadRequest, err)
		}
		patch["window"] = win
		msg += " " + win
	case CutoverManual:
	default:
		return fmt.Errorf("%w: unknown cutover policy %q", ErrBadRequest, policy)
	}
	b, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	// JSON nulls would stay as nulls; strip them so the keys go away.
	return s.control(ctx, id, actor, "cutover_policy", msg, patch, "spec = jsonb_strip_nulls(spec || $2::jsonb), cutover_held = false", string(b))
}

// DriverInfo says which daemon drives a migration (status "driver").
type DriverInfo struct {
	Daemon     string     `json:"daemon"`
	Since      time.Time  `json:"since"`
	LastError  string     `json:"last_error"`
	ReleasedAt *time.Time `json:"released_at"`
}

// SetDriver records the migration's driver.
func (s *Store) SetDriver(ctx context.Context, id string, d DriverInfo) error {
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	err = s.shortTx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE `+s.Cat.T("migrations")+` SET driver = $2 WHERE id = $1`, id, b)
		return err
	})
	if err != nil {
		return fmt.Errorf("migration %s: record driver: %w", id, err)
	}
	return nil
}

// SetThrottled records why the copy waits ("" when it no longer does).
func (s *Store) SetThrottled(ctx context.Context, id, reason string) error {
	err := s.shortTx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE `+s.Cat.T("migrations")+` SET throttled = nullif($2, '') WHERE id = $1 AND coalesce(throttled, '') <> $2`, id, reason)
		return err
	})
	if err != nil {
		return fmt.Errorf("migration %s: record throttle: %w", id, err)
	}
	return nil
}

// EventsSince reads a migration's events after event id after.
func (s *Store) EventsSince(ctx context.Context, id string, after int64) ([]EventRecord, error) {
	rows, err := s.Pool.Query(ctx, `SELECT id, at, actor, kind, message, data FROM `+s.Cat.T("events")+` WHERE migration_id = $1 AND id > $2 ORDER BY id`, id, after)
	if err != nil {
		return nil, fmt.Errorf("migration %s: read events: %w", id, err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (EventRecord, error) {
		var e EventRecord
		err := r.Scan(&e.ID, &e.At, &e.Actor, &e.Kind, &e.Message, &e.Data)
		return e, err
	})
}

// LastEventID is the newest event id of a migration (0 when none).
func (s *Store) LastEventID(ctx context.Context, id string) (int64, error) {
	var n int64
	err := s.Pool.QueryRow(ctx, `SELECT coalesce(max(id), 0) FROM `+s.Cat.T("events")+` WHERE migration_id = $1`, id).Scan(&n)
	return n, err
}

// catalogLockTimeout bounds how long a control write waits for the
// migration's row (a swap holds it for its short transaction).
const catalogLockTimeout = 5 * time.Second

// shortTx runs fn in a transaction under catalogLockTimeout.
func (s *Store) shortTx(ctx context.Context, fn func(tx pgx.Tx) error) error {
	return pgx.BeginFunc(ctx, s.Pool, func(tx pgx.Tx) error {
		if err := pgsql.SetLocalLockTimeout(ctx, tx, catalogLockTimeout); err != nil {
			return err
		}
		return fn(tx)
	})
}

// HookProgress returns the event id up to which the migration's hooks have
// run and the id of its newest phase event.
func (s *Store) HookProgress(ctx context.Context, id string) (done, last int64, err error) {
	err = s.Pool.QueryRow(ctx, `SELECT m.hooks_done, coalesce((SELECT max(e.id) FROM `+s.Cat.T("events")+` e
		WHERE e.migration_id = m.id AND e.kind = 'phase'), 0) FROM `+s.Cat.T("migrations")+` m WHERE m.id = $1`, id).Scan(&done, &last)
	if err != nil {
		return 0, 0, fmt.Errorf("migration %s: read hook progress: %w", id, err)
	}
	return done, last, nil
}

// SetHooksDone records that the hooks of every event up to upto have run.
func (s *Store) SetHooksDone(ctx context.Context, id string, upto int64) error {
	err := s.shortTx(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE `+s.Cat.T("migrations")+` SET hooks_done = $2 WHERE id = $1 AND hooks_done < $2`, id, upto)
		return err
	})
	if err != nil {
		return fmt.Errorf("migration %s: record hook progress: %w", id, err)
	}
	return nil
}

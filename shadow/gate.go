package shadow

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/retry"
)

// ThrottleRecheck is how often a throttled copy checks again.
var ThrottleRecheck = time.Second

// gateLive runs before each copy batch (after the pause/phase check): it
// applies live settings (`shadowctl set`) to the copier and waits while a
// throttle condition holds, recording the reason for status.
func (r *Runner) gateLive(ctx context.Context, cur *Migration, c *backfill.Copier) error {
	for {
		if cur.Request.BatchSize > 0 {
			c.SetBatchSize(cur.Request.BatchSize)
		}
		if cur.Request.Workers > 0 {
			c.SetWorkers(cur.Request.Workers)
		}
		if rate := int64(cur.Request.MaxRowsPerSecond); c.MaxRowsPerSecond.Load() != rate {
			c.MaxRowsPerSecond.Store(rate)
			r.Log.Info().Str("migration", cur.ID).Int64("max_rows_per_second", rate).Msg("copy rate cap changed")
		}
		reason, err := r.throttleReason(ctx, cur)
		if err != nil {
			return err
		}
		if reason != cur.Throttled {
			// Status shows the reason as it is now (a replica's lag, which
			// changes at every check); the log says when the copy stops
			// and when it goes on.
			if err := r.Store.SetThrottled(ctx, cur.ID, reason); err != nil {
				return err
			}
			switch {
			case cur.Throttled == "":
				r.Log.Warn().Str("migration", cur.ID).Str("reason", reason).Msg("copy throttled")
			case reason == "":
				r.Log.Info().Str("migration", cur.ID).Str("was", cur.Throttled).Msg("copy no longer throttled")
			}
		}
		if reason == "" {
			return nil
		}
		t := time.NewTimer(ThrottleRecheck)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		next, err := r.Store.Get(ctx, r.Pool, cur.ID)
		if err != nil {
			return err
		}
		if next.Phase != Copying || next.Paused {
			return fmt.Errorf("migration %s is now %s (paused=%v): %w", cur.ID, next.Phase, next.Paused, ErrStopped)
		}
		next.Throttled = reason
		cur = next
	}
}

// throttleReason says why the copy must wait now ("" when it need not).
func (r *Runner) throttleReason(ctx context.Context, m *Migration) (string, error) {
	if lim := m.Request.MaxReplicaLag; lim > 0 {
		var lag float64
		if err := r.Pool.QueryRow(ctx, `SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication`).Scan(&lag); err != nil {
			return "", fmt.Errorf("read replica lag: %w", err)
		}
		if d := time.Duration(lag * float64(time.Second)); d > lim {
			return fmt.Sprintf("replica lag %s > --max-replica-lag %s", d.Round(time.Millisecond), lim), nil
		}
	}
	if q := m.Request.ThrottleQuery; q != "" {
		var wait bool
		err := pgx.BeginTxFunc(ctx, r.Pool, pgx.TxOptions{AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SET LOCAL statement_timeout = '5s'`); err != nil {
				return err
			}
			if err := pgsql.SetLocalLockTimeout(ctx, tx, max(m.Request.LockTimeout, time.Second)); err != nil {
				return err
			}
			return tx.QueryRow(ctx, q).Scan(&wait)
		})
		if err != nil {
			if ctx.Err() != nil {
				return "", ctx.Err()
			}
			// A broken throttle query holds the copy (the safe side) and says so.
			return "throttle query failed: " + pgsql.Describe(err), nil
		}
		if wait {
			return "throttle query returned true", nil
		}
	}
	return "", nil
}

// lockGreenSchemaName takes a transaction-level advisory lock on the green
// schema's name, without queueing (try, back off, try again), so concurrent
// prepares do not race to create it.
func lockGreenSchemaName(ctx context.Context, tx pgx.Tx, schema string) error {
	for attempt := 0; ; attempt++ {
		var got bool
		if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock(hashtextextended('shadowctl.green-schema:' || $1, 0))`, schema).Scan(&got); err != nil {
			return fmt.Errorf("lock green schema name %s: %w", schema, err)
		}
		if got {
			return nil
		}
		if attempt >= 200 {
			return fmt.Errorf("lock green schema name %s: %w", schema, ErrGreenSchemaBusy)
		}
		if err := retry.Backoff(ctx, attempt, 10*time.Millisecond, 500*time.Millisecond); err != nil {
			return err
		}
	}
}

// ErrGreenSchemaBusy means another migration kept building in the same green
// schema for too long.
var ErrGreenSchemaBusy = errors.New("another migration is creating its green table in this schema")

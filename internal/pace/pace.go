// Package pace decides how hard shadowctl's background work (the bulk copy,
// the verification, the index builds, the logical apply) may run while the
// application uses the same server: all its workers flat out on an idle
// database, one worker on a duty cycle while the application is busy.
//
// Busy is measured, not guessed from a commit rate (which counts shadowctl's
// own transactions too): it is the average number of the application's
// sessions running a statement or in the middle of a transaction
// (pg_stat_activity, state 'active' or 'idle in transaction', client backends
// other than shadowctl's own), sampled a few times a second. A CPU-bound OLTP
// workload shows 1–4 such sessions at any instant on a small server; an idle
// one shows none. The sessions between two statements of a transaction
// count because a client starved of CPU spends its time there: counting
// only 'active' ones, background work running flat out hid the application
// it was starving (the bench's verification held the application at 40 %
// of its throughput for 30 s, the gauge reading "quiet" all along).
package pace

import (
	"context"
	"sync"
	"time"

	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/retry"
)

// DefaultLoadShare is the share of one worker's time the copy and the
// verification may use while the application is busy, when nothing else of
// shadowctl's runs in the application's transactions (logical sync).
// Measured on 2 cores (make bench, 4-client OLTP): one copy worker flat out
// leaves the application about half its throughput; a third of a worker
// leaves it 0.86–0.92 with logical sync.
const DefaultLoadShare = 0.33

// InTransactionSyncLoadShare is the default share when the sync already
// runs in the application's own transactions (trigger sync): its write into
// green costs the application about 17 % by itself, as the plain
// upsert trigger does, so the copy beside it takes less. On the same bench
// the copy phase ran at 0.88–0.90 of the sync-only rate with a third of a
// worker and at 0.94–0.98 with a fifth; time to ready under load went from
// 47–50 s to 82–88 s at 2,000,000 rows (three alternated runs each).
const InTransactionSyncLoadShare = 0.2

// Pace is how background work may run now.
type Pace struct {
	// Workers is how many workers may run (≥ 1).
	Workers int
	// Duty is the share of each worker's time spent working (0 < Duty ≤ 1);
	// after a step that took d, a worker rests d × (1 − Duty) / Duty.
	Duty float64
	// Busy says the application was busy when this was decided.
	Busy bool
}

// Rest is how long to wait after a step that took took.
func (p Pace) Rest(took time.Duration) time.Duration {
	if p.Duty <= 0 || p.Duty >= 1 {
		return 0
	}
	return time.Duration(float64(took) * (1 - p.Duty) / p.Duty)
}

// RestAfter sleeps Rest(took), returning early with the context's error.
func (p Pace) RestAfter(ctx context.Context, took time.Duration) error {
	if d := p.Rest(took); d > 0 {
		return retry.Sleep(ctx, d)
	}
	return nil
}

// Func returns the pace to use now.
type Func func(ctx context.Context) Pace

// WaitTurn holds worker w (numbered from 0) while the pace allows fewer
// workers than w+1. It reports false, without waiting further, once
// handedOut says every piece of work was taken (the running workers finish
// it); a nil f never holds anyone.
func WaitTurn(ctx context.Context, f Func, w int, handedOut func() bool) (bool, error) {
	for f != nil && w >= f(ctx).Workers {
		if handedOut() {
			return false, nil
		}
		if err := retry.Sleep(ctx, 200*time.Millisecond); err != nil {
			return false, err
		}
	}
	return true, nil
}

// Full is the pace of work that never steps back.
func Full(workers int) Func {
	return func(context.Context) Pace { return Pace{Workers: max(workers, 1), Duty: 1} }
}

// AppLoad returns a Func that samples the application's activity through q at
// most every sampleEvery and answers with all workers at full duty while the
// application is quiet, one worker at share while it is busy. ownApp is the
// application_name of shadowctl's own sessions, left out of the count. share
// ≥ 1 turns the duty cycle off (one worker at full speed while busy).
func AppLoad(q pgsql.Querier, ownApp string, workers int, share float64) Func {
	const (
		sampleEvery = 250 * time.Millisecond
		// Hysteresis: busy above an average of half a session running a
		// statement, quiet again below a quarter.
		busyAbove, quietBelow = 0.5, 0.25
		// Weight of a new sample in the moving average (about 2 s memory).
		weight = 0.15
	)
	if share <= 0 || share > 1 {
		share = 1
	}
	workers = max(workers, 1)
	var (
		mu     sync.Mutex
		lastAt time.Time
		avg    float64
		busy   bool
	)
	return func(ctx context.Context) Pace {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(lastAt) >= sampleEvery {
			var active float64
			err := q.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND state IN ('active', 'idle in transaction') AND pid <> pg_backend_pid()
   AND datname = current_database() AND ($1 = '' OR application_name IS DISTINCT FROM $1)`, ownApp).Scan(&active)
			if err == nil {
				if lastAt.IsZero() {
					avg = active
				} else {
					avg = weight*active + (1-weight)*avg
				}
				lastAt = time.Now()
				switch {
				case avg > busyAbove:
					busy = true
				case avg < quietBelow:
					busy = false
				}
			}
		}
		if busy {
			return Pace{Workers: 1, Duty: share, Busy: true}
		}
		return Pace{Workers: workers, Duty: 1}
	}
}

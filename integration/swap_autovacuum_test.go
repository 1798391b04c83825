package integration

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/shadow"
)

// An autovacuum of blue holds a lock the swap needs for as long as it runs.
// PostgreSQL cancels an autovacuum only for a session that has waited behind
// it for deadlock_timeout (1 s), and the swap never waits that long (its
// lock_timeout is 100 ms), so the swap cancels it itself. Here the
// autovacuum is throttled to run for a minute or more; the cutover's
// deadline is 15 s.
func TestSwapCancelsAnAutovacuumInItsWay(t *testing.T) {
	ctx := context.Background()
	srv := ownCluster(t, "whose autovacuum looks every second", map[string]string{"autovacuum_naptime": "1"})
	db := dbOn(t, srv)
	pool := db.Pool
	createItems(db, "items", 50000)
	db.exec(`ALTER TABLE items SET (autovacuum_enabled = false)`)
	m := db.ready(shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint"})

	// Dead rows in every page of blue, and an autovacuum that sleeps 100 ms
	// after each page it reads.
	db.exec(`UPDATE items SET n = n + 1`,
		`ALTER TABLE items SET (autovacuum_enabled = true, autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
			autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1)`)
	var avPID int32
	waitTrue(t, 60*time.Second, "an autovacuum to work on blue", func() bool {
		return pool.QueryRow(ctx, `SELECT pid FROM pg_stat_activity
			WHERE backend_type = 'autovacuum worker' AND query LIKE '%VACUUM%public.items%'`).Scan(&avPID) == nil
	})

	var mu sync.Mutex
	var canceled []cutover.Blocker
	started := time.Now()
	m, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{LockTimeout: 100 * time.Millisecond, Deadline: 15 * time.Second,
		OnAttempt: func(a cutover.Attempt) {
			mu.Lock()
			defer mu.Unlock()
			for _, b := range a.Blockers {
				if b.Autovacuum && b.Canceled {
					canceled = append(canceled, b)
				}
			}
		}})
	took := time.Since(started)
	if err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("cutover behind an autovacuum: %v (after %s)", err, took)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(canceled) == 0 || canceled[0].PID != avPID {
		t.Fatalf("canceled autovacuum blockers %+v, want pid %d", canceled, avPID)
	}
	t.Logf("cut over in %s, canceling the autovacuum %s", took.Round(time.Millisecond), canceled[0])
}

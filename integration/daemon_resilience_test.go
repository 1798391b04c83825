package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// The daemon's database connections are terminated mid-copy: the migration
// does not fail, status shows why the driver stopped (driver.last_error),
// and the daemon reconnects with backoff and finishes from the checkpoint.
func TestDaemonSurvivesLostConnections(t *testing.T) {
	db := newTestDB(t)
	const rows = 8000
	db.createOrders(rows)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 2000})
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemonProc(t, db.DSN, "--poll", "200ms")
	waitTrue(t, 60*time.Second, "the copy to run", func() bool { return db.rowsCopied(m.ID) >= 1500 })
	n := scalar[int64](db, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name LIKE 'shadowctl%' AND pid <> pg_backend_pid() AND datname = current_database()`)
	if n < 2 {
		t.Fatalf("terminated %d daemon sessions, want the pool's and the claim's", n)
	}
	var lastErr string
	waitTrue(t, 30*time.Second, "status to show why the driver stopped", func() bool {
		st := shadow.StatusOf(db.migration(m.ID), time.Now())
		if st.Phase == string(shadow.Failed) {
			t.Fatalf("the migration failed on a lost connection: %s", st.Error)
		}
		if st.Driver != nil && st.Driver.LastError != "" {
			lastErr = st.Driver.LastError
			return true
		}
		return false
	})
	t.Logf("driver.last_error: %s", lastErr)
	db.waitPhase(m.ID, shadow.Ready, 60*time.Second)
	if got := db.rowsCopied(m.ID); got != rows {
		t.Fatalf("%d rows counted by the checkpoints, want %d", got, rows)
	}
	if by := db.claimedBy(m.ID); len(by) < 2 || by[len(by)-1] != d.identity() {
		t.Fatalf("claimed by %v: want the same daemon to claim again after reconnecting", by)
	}
	// At ready (manual cutover) the daemon lets go, and a clean run clears the error.
	waitTrue(t, 30*time.Second, "the driver to release the migration with last_error cleared", func() bool {
		st := shadow.StatusOf(db.migration(m.ID), time.Now())
		return st.Driver != nil && st.Driver.ReleasedAt != nil && st.Driver.LastError == ""
	})
	db.assertGreenMatches(`SELECT id, amount::numeric(12,2) FROM public.orders`, `SELECT id, amount FROM green.orders`)
}

// SIGTERM mid-copy: the daemon exits 0 at a checkpoint and releases its
// claim (driver.released_at); a new daemon continues from there.
func TestDaemonSIGTERMStopsAtCheckpoint(t *testing.T) {
	db := newTestDB(t)
	const rows = 6000
	db.createOrders(rows)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 2000})
	if err != nil {
		t.Fatal(err)
	}
	d1 := startDaemonProc(t, db.DSN, "--poll", "200ms")
	waitTrue(t, 60*time.Second, "the copy to run", func() bool { return db.rowsCopied(m.ID) >= 1000 })
	if code := d1.terminate(t); code != 0 {
		t.Fatalf("exit %d on SIGTERM, want 0", code)
	}
	cur := db.migration(m.ID)
	st := shadow.StatusOf(cur, time.Now())
	if cur.Phase != shadow.Copying || st.Driver == nil || st.Driver.ReleasedAt == nil || st.Driver.LastError != "" {
		t.Fatalf("after SIGTERM: phase %s, driver %+v; want copying, released, no error", cur.Phase, st.Driver)
	}
	if n := scalar[int64](db, `SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'shadowctl%' AND datname = current_database()`); n != 0 {
		t.Fatalf("%d daemon sessions left after SIGTERM", n)
	}
	atStop := db.rowsCopied(m.ID)
	startDaemonProc(t, db.DSN, "--poll", "200ms")
	db.waitPhase(m.ID, shadow.Ready, 60*time.Second)
	if got := db.rowsCopied(m.ID); got != rows || atStop >= rows {
		t.Fatalf("rows counted %d (at SIGTERM %d), want %d", got, atStop, rows)
	}
}

// An operator's throttle query holds the copy while it returns true, and
// status says why; when it turns false the copy goes on.
func TestDaemonThrottleQuery(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(4000)
	db.exec(`CREATE TABLE hold_copy (on_hold boolean NOT NULL)`, `INSERT INTO hold_copy VALUES (false)`)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 2000, ThrottleQuery: "SELECT on_hold FROM hold_copy"})
	if err != nil {
		t.Fatal(err)
	}
	db.startDaemon(daemon.Config{})
	waitTrue(t, 60*time.Second, "the copy to run", func() bool { return db.rowsCopied(m.ID) >= 500 })
	db.exec(`UPDATE hold_copy SET on_hold = true`)
	if reason := db.throttledReason(m.ID); !strings.Contains(reason, "throttle query") {
		t.Fatalf("throttled: %q", reason)
	}
	db.assertCopyHeld(m.ID, db.rowsCopied(m.ID))
	db.exec(`UPDATE hold_copy SET on_hold = false`)
	m2 := db.waitPhase(m.ID, shadow.Ready, 60*time.Second)
	if m2.Throttled != "" {
		t.Fatalf("still throttled at ready: %q", m2.Throttled)
	}
}

// A throttle query that fails holds the copy (the safe side), and status
// says why, with PostgreSQL's message; fixed, the copy goes on.
func TestDaemonBrokenThrottleQueryHoldsTheCopy(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(4000)
	db.exec(`CREATE TABLE hold_copy (divisor int NOT NULL)`, `INSERT INTO hold_copy VALUES (1)`)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 2000, ThrottleQuery: "SELECT 1 / divisor = 0 FROM hold_copy"})
	if err != nil {
		t.Fatal(err)
	}
	db.startDaemon(daemon.Config{})
	waitTrue(t, 60*time.Second, "the copy to run", func() bool { return db.rowsCopied(m.ID) >= 500 })
	db.exec(`UPDATE hold_copy SET divisor = 0`)
	if reason := db.throttledReason(m.ID); !strings.Contains(reason, "throttle query failed") || !strings.Contains(reason, "division by zero") {
		t.Fatalf("throttled: %q, want the failed query and PostgreSQL's message", reason)
	}
	db.assertCopyHeld(m.ID, db.rowsCopied(m.ID))
	db.exec(`UPDATE hold_copy SET divisor = 1`)
	if m2 := db.waitPhase(m.ID, shadow.Ready, 60*time.Second); m2.Throttled != "" {
		t.Fatalf("still throttled at ready: %q", m2.Throttled)
	}
}

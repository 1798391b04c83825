package integration

import (
	"context"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 5, done-when 1: kill -9 of the daemon mid-copy, then a new daemon:
// the copy resumes from its checkpoints (rows copied do not restart from
// zero: every row is counted exactly once) and reaches ready with green exact.
func TestDaemonKill9MidCopyResumesFromCheckpoint(t *testing.T) {
	db := newTestDB(t)
	const rows = 8000
	db.createOrders(rows)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 2000, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	d1 := startDaemonProc(t, db.DSN, "--poll", "200ms")
	waitTrue(t, 60*time.Second, "the first daemon to copy 1500 rows", func() bool { return db.rowsCopied(m.ID) >= 1500 })
	d1.kill9()
	atKill := db.rowsCopied(m.ID)
	if cur := db.migration(m.ID); cur.Phase != shadow.Copying || atKill >= rows {
		t.Fatalf("after kill -9: phase %s, %d rows copied: the kill was not mid-copy", cur.Phase, atKill)
	}
	t.Logf("killed daemon %s with %d of %d rows copied", d1.identity(), atKill, rows)

	d2 := startDaemonProc(t, db.DSN, "--poll", "200ms")
	minSeen := int64(rows)
	waitTrue(t, 60*time.Second, "ready under the second daemon", func() bool {
		n := db.rowsCopied(m.ID)
		minSeen = min(minSeen, n)
		return db.migration(m.ID).Phase == shadow.Ready
	})
	if minSeen < atKill {
		t.Fatalf("rows copied went back from %d to %d: the copy restarted", atKill, minSeen)
	}
	if n := db.rowsCopied(m.ID); n != rows {
		t.Fatalf("%d rows counted by the checkpoints, want exactly %d (each row copied once)", n, rows)
	}
	by := db.claimedBy(m.ID)
	if len(by) != 2 || by[0] != d1.identity() || by[1] != d2.identity() {
		t.Fatalf("claimed by %v, want [%s %s]", by, d1.identity(), d2.identity())
	}
	db.assertGreenMatches(
		`SELECT id, customer_id, customer_name, amount::numeric(12,2), status, created_at FROM public.orders`,
		`SELECT id, customer_id, customer_name, amount, status, created_at FROM green.orders`)
	// SIGTERM: the daemon exits 0.
	if code := d2.terminate(t); code != 0 {
		t.Fatalf("daemon exited %d on SIGTERM, want 0", code)
	}
}

// Issue 5, done-when 2: two daemons on one catalog, two migrations on two
// tables: each migration is driven by exactly one daemon; kill -9 of that
// daemon hands it to the other, which finishes it.
func TestDaemonTwoDaemonsExclusiveAndHandOver(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(6000)
	db.exec(`CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)`,
		`INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 6000) g`, `ANALYZE items`)
	ctx := context.Background()
	var ids []string
	for _, req := range []shadow.Request{
		{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)"},
		{Table: "items", Alter: "ALTER COLUMN v TYPE varchar(100)"},
	} {
		req.BatchSize, req.MaxRowsPerSecond = 100, 1500
		m, err := db.Runner.Submit(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	procs := []*daemonProc{startDaemonProc(t, db.DSN, "--poll", "200ms"), startDaemonProc(t, db.DSN, "--poll", "200ms")}
	byIdentity := map[string]*daemonProc{procs[0].identity(): procs[0], procs[1].identity(): procs[1]}
	for _, id := range ids {
		waitTrue(t, 60*time.Second, "both migrations copying under a daemon", func() bool {
			m := db.migration(id)
			return m.Phase == shadow.Copying && db.rowsCopied(id) >= 300
		})
	}
	driver := map[string]string{}
	for _, id := range ids {
		by := db.claimedBy(id)
		if len(by) != 1 || byIdentity[by[0]] == nil {
			t.Fatalf("migration %s claimed by %v, want exactly one of the two daemons", id, by)
		}
		driver[id] = by[0]
		// The claim is one session's advisory lock, held by that daemon's connection.
		if n := scalar[int64](db, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, "shadowctl driver "+id); n != 1 {
			t.Fatalf("migration %s: %d driver sessions, want 1", id, n)
		}
		if st := shadow.StatusOf(db.migration(id), time.Now()); st.Driver == nil || st.Driver.Daemon != by[0] || st.Driver.ReleasedAt != nil {
			t.Fatalf("migration %s: status driver %+v, want %s", id, st.Driver, by[0])
		}
	}
	t.Logf("drivers: %v", driver)
	victim := byIdentity[driver[ids[0]]]
	victim.kill9()
	var survivor string
	for ident := range byIdentity {
		if ident != driver[ids[0]] {
			survivor = ident
		}
	}
	for _, id := range ids {
		db.waitPhase(id, shadow.Ready, 60*time.Second)
	}
	for _, id := range ids {
		by := db.claimedBy(id)
		if driver[id] == driver[ids[0]] {
			if len(by) != 2 || by[1] != survivor {
				t.Fatalf("migration %s: claimed by %v, want the survivor %s to take over", id, by, survivor)
			}
		} else if len(by) != 1 {
			t.Fatalf("migration %s: claimed by %v, want only %s", id, by, driver[id])
		}
		if n := db.rowsCopied(id); n != 6000 {
			t.Fatalf("migration %s: %d rows counted by the checkpoints, want 6000", id, n)
		}
	}
	db.assertGreenMatches(`SELECT id, v::varchar(100) FROM public.items`, `SELECT id, v FROM green.items`)
	db.assertGreenMatches(`SELECT id, amount::numeric(12,2) FROM public.orders`, `SELECT id, amount FROM green.orders`)
}

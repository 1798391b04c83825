package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 5, done-when 6: with --auto-rollback, green rows corrupted behind
// the tool's back after the cutover make the daemon's verification fail and
// roll back to blue on its own, recording why; the application (4 clients
// writing throughout) sees zero errors and loses no write.
func TestDaemonAutoRollbackOnCorruptedGreen(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(20000)
	ctx := context.Background()
	w := startWorkload(t, db.DSN, 4)
	w.waitRunning()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint",
		BatchSize: 2000, CutoverPolicy: shadow.CutoverAuto, AutoRollback: true, VerifyEvery: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	db.startDaemon(daemon.Config{})
	db.waitPhase(m.ID, shadow.CutOver, 60*time.Second)
	// At least one clean verification after the cutover, under the workload.
	waitTrue(t, 30*time.Second, "a clean verification after the cutover", func() bool {
		cur := db.migration(m.ID)
		return cur.Phase == shadow.CutOver && strings.Contains(string(cur.Verify), `"ok": true`) && cur.State.LastCutover != nil &&
			scalar[bool](db, `SELECT (verify->>'at')::timestamptz > $1 FROM shadowctl.migrations WHERE id = $2`, cur.State.LastCutover.At, m.ID)
	})
	if p := db.migration(m.ID).Phase; p != shadow.CutOver {
		t.Fatalf("phase %s before the corruption: a clean green was rolled back", p)
	}
	w.waitOps(200)
	// Behind the tool's back: change green without firing the reverse sync.
	err = pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL session_replication_role = replica`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE green.orders SET customer_name = 'corrupted' WHERE id IN (SELECT id FROM green.orders ORDER BY id LIMIT 5)`)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	db.waitPhase(m.ID, shadow.RolledBack, 60*time.Second)
	waitTrue(t, 30*time.Second, "the auto-rollback to be recorded", func() bool { return len(db.events(m.ID, "auto_rollback")) > 0 })
	cur := db.migration(m.ID)
	if !strings.Contains(cur.Error, "auto-rollback") || !cur.CutoverHeld {
		t.Fatalf("after the auto-rollback: error %q, cutover_held %v; want the reason and a held cutover", cur.Error, cur.CutoverHeld)
	}
	if evs := db.events(m.ID, "auto_rollback"); len(evs) != 1 || !strings.Contains(evs[0].Message, "differ") && !strings.Contains(evs[0].Message, "difference") {
		t.Fatalf("auto_rollback events %+v", evs)
	}
	if kind := scalar[string](db, `SELECT relkind::text FROM pg_class WHERE oid = 'public.orders'::regclass`); kind != "r" {
		t.Fatalf("public.orders relkind %s after the rollback, want r (blue)", kind)
	}
	w.waitOps(200) // writes go on against blue
	// No new automatic cutover: the rollback held it.
	w.stopAndCheck(t)
	if p := db.migration(m.ID).Phase; p != shadow.RolledBack {
		t.Fatalf("phase %s at the end, want rolled_back (held)", p)
	}
}

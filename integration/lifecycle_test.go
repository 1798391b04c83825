package integration

import (
	"context"
	"fmt"
	"testing"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 4, done-when 1: 4 clients write through public.orders for the whole
// start → cutover → rollback → cutover → finalize with zero errors, and the
// final table equals exactly what they wrote.
//
// Every lifecycle test runs in both sync modes.
func TestLifecycleUnderWorkload(t *testing.T) {
	forEachSyncMode(t, testLifecycleUnderWorkload)
}

func testLifecycleUnderWorkload(t *testing.T, mode shadow.SyncMode) {
	db := newTestDB(t)
	db.createOrders(40000)
	ctx := context.Background()
	w := startWorkload(t, db.DSN, 4)
	w.waitRunning()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint", BatchSize: 2000, Sync: mode})
	if err != nil {
		t.Fatal(err)
	}
	db.Runner.Failpoints.CopyBatch = func(ctx context.Context, _ backfill.Range) error {
		// Issue 6, done-when 2: no trigger of the tool's on blue while copying in logical mode.
		if n := db.toolTriggersOnBlue(ctx); mode == shadow.SyncLogical && n != 0 {
			return fmt.Errorf("logical mode: %d tool triggers on blue during the copy", n)
		} else if mode == shadow.SyncTrigger && n == 0 {
			return fmt.Errorf("trigger mode: no sync trigger on blue during the copy")
		}
		// Nor a snapshot held open for the copy: it would keep the
		// workload's dead row versions from being pruned until the end.
		var held int
		if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'walsender' AND backend_xmin IS NOT NULL`).Scan(&held); err != nil {
			return err
		}
		if held != 0 {
			return fmt.Errorf("%d replication connections hold a snapshot during the copy", held)
		}
		return nil
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	db.Runner.Failpoints.CopyBatch = nil
	// The checkpoints recorded the whole copy.
	if m.RowsCopied < 40000 {
		t.Fatalf("checkpoints say %d rows copied, want at least 40000", m.RowsCopied)
	}
	step := func(name string, fn func() (*shadow.Migration, error), want shadow.Phase, serving string) {
		t.Helper()
		w.waitOps(100)
		m, err := fn()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if m.Phase != want {
			t.Fatalf("%s: phase %s, want %s", name, m.Phase, want)
		}
		if got := scalar[string](db, `SELECT CASE relkind WHEN 'v' THEN 'view' ELSE 'table' END FROM pg_class WHERE oid = 'public.orders'::regclass`); got != serving {
			t.Fatalf("%s: public.orders is a %s, want %s", name, got, serving)
		}
		w.waitOps(100)
	}
	opts := shadow.CutoverOptions{}
	step("cutover", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, m.ID, opts) }, shadow.CutOver, "view")
	step("rollback", func() (*shadow.Migration, error) { return db.Runner.Rollback(ctx, m.ID, opts) }, shadow.RolledBack, "table")
	step("cutover again", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, m.ID, opts) }, shadow.CutOver, "view")
	step("finalize", func() (*shadow.Migration, error) { return db.Runner.Finalize(ctx, m.ID, 0, true, opts) }, shadow.Finalized, "table")
	w.stopAndCheck(t)

	if typ := scalar[string](db, `SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.orders'::regclass AND attname = 'amount'`); typ != "numeric(12,2)" {
		t.Fatalf("amount is %s after finalize", typ)
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid WHERE NOT t.tgisinternal`); n != 0 {
		t.Fatalf("%d triggers left after finalize", n)
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_namespace WHERE nspname = 'green'`); n != 0 {
		t.Fatal("green schema left after finalize")
	}
	if owner := scalar[string](db, `SELECT pg_get_serial_sequence('public.orders', 'id')`); owner == "" {
		t.Fatal("the id sequence is not owned by the table after finalize")
	}
}

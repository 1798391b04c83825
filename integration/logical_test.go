package integration

import (
	"context"
	"errors"
	"os/exec"
	"slices"
	"strings"
	gosync "sync"
	"syscall"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
	"github.com/shadowctl/shadowctl/sync"
)

// logicalOrdersAtReady makes orders with n rows and drives a logical
// migration of it (amount to numeric) to ready.
func logicalOrdersAtReady(t *testing.T, n int) (*testDB, *shadow.Migration) {
	t.Helper()
	db := newTestDB(t)
	db.createOrders(n)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", Sync: shadow.SyncLogical})
	if err != nil {
		t.Fatal(err)
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	return db, m
}

// Issue 6, done-when 3: kill -9 of the process applying the stream, then a
// new one: no change lost or applied twice (exact end state), and the slot's
// confirmed position never passes what green committed.
func TestLogicalKill9MidStreamResumes(t *testing.T) {
	db, m := logicalOrdersAtReady(t, 20000)
	ctx := context.Background()
	var err error
	w := startWorkload(t, db.DSN, 4)
	w.waitRunning()

	follow := func() *exec.Cmd {
		cmd := exec.Command(shadowctlBinary(t), "--dsn", db.DSN, "--log-level", "warn", "follow", m.ID)
		cmd.Env = append(cmd.Environ(), "GORACE=atexit_sleep_ms=0")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	applied := func() string {
		return scalar[string](db, `SELECT applied_lsn::text FROM shadowctl.sync_positions WHERE migration_id = $1`, m.ID)
	}
	positionsOK := func() {
		t.Helper()
		// The slot acknowledges only what green committed.
		if bad := scalar[bool](db, `SELECT s.confirmed_flush_lsn > p.applied_lsn FROM pg_replication_slots s, shadowctl.sync_positions p
			WHERE s.slot_name = p.slot_name AND p.migration_id = $1`, m.ID); bad {
			t.Fatal("the slot's confirmed position is past what green committed")
		}
	}
	first := follow()
	start := applied()
	waitFor(t, "the first follower to apply changes", time.Minute, func() (bool, error) { return applied() != start, nil })
	w.waitOps(300)
	positionsOK()
	if err := first.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = first.Wait()
	atKill := applied()
	w.waitOps(300) // changes pile up with nobody applying them
	second := follow()
	waitFor(t, "the second follower to apply changes", time.Minute, func() (bool, error) { return applied() != atKill, nil })
	positionsOK()
	w.waitOps(200)
	if errs := w.stop(); len(errs) > 0 {
		t.Fatalf("workload errors: %v", errs[0])
	}
	defer w.pool.Close()
	w.assertExact(t) // blue holds exactly what the workload wrote
	m, err = db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_ = second.Wait() // it stops by itself once the cutover replaced the stream
	if m.Phase != shadow.CutOver {
		t.Fatalf("phase %s", m.Phase)
	}
	w.assertExact(t) // and now green, through the view, holds exactly the same
	if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
}

// Issue 6, done-when 5: a large TOASTed column whose row is updated in other
// columns only (pgoutput sends it as "unchanged") keeps its value in green.
func TestLogicalUnchangedToastKeepsValue(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	db.exec(`CREATE TABLE docs (id int PRIMARY KEY, title text, body text)`,
		`ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL`, // out of line, uncompressed
		`INSERT INTO docs SELECT g, 'title ' || g, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 2000) i) FROM generate_series(1, 50) g`)
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "docs", Alter: "ADD COLUMN views int DEFAULT 0", Sync: shadow.SyncLogical})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	fctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- db.Runner.Follow(fctx, m.ID) }()
	db.exec(`UPDATE docs SET title = 'changed ' || id WHERE id <= 25`)
	m, err = db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}) // drains the stream first
	stop()
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if n := scalar[int](db, `SELECT count(*) FROM green.docs WHERE title LIKE 'changed %'`); n != 25 {
		t.Fatalf("%d updated titles reached green, want 25", n)
	}
	db.assertGreenMatches(`SELECT id, title, body FROM `+m.State.Plan.Reverse.Target.Quoted()+``, `SELECT id, title, body FROM green.docs`)
	if n := scalar[int](db, `SELECT count(*) FROM green.docs WHERE body IS NULL OR length(body) <> 64000`); n != 0 {
		t.Fatalf("%d bodies lost or changed in green", n)
	}
	if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
}

// The stream replays the past: here an order whose customer is deleted
// before the replay reaches it. Green gets its foreign keys at the cutover,
// once it equals blue, so the replay goes through (a foreign key on green
// would reject the insert and stop the sync for good), and after the
// cutover the key is there and valid.
func TestLogicalReplayOfAnOrderWhoseCustomerIsGone(t *testing.T) {
	db, m := logicalOrdersAtReady(t, 2000)
	ctx := context.Background()
	var err error
	if all, _ := db.foreignKeysOf("green.orders"); all != 0 {
		t.Fatalf("green has %d foreign keys at ready; they belong to the cutover in logical mode", all)
	}
	// Nobody applies the stream now: all of this waits in the slot. The
	// 6,000 updates between the order's insert and its delete put them in
	// different pieces of the apply (it merges an insert and a delete of
	// the same key that meet in one).
	db.exec(`INSERT INTO customers VALUES (5001, 'leaving', NULL)`,
		`INSERT INTO orders (id, customer_id, customer_name, amount) VALUES (900001, 5001, 'leaving', 1)`,
		`UPDATE orders SET status = 'bulk 1'`, `UPDATE orders SET status = 'bulk 2'`, `UPDATE orders SET status = 'bulk 3'`,
		`DELETE FROM orders WHERE id = 900001`,
		`DELETE FROM customers WHERE id = 5001`,
		`UPDATE orders SET status = 'after' WHERE id = 7`)
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	m, err = db.Runner.Cutover(cctx, m.ID, shadow.CutoverOptions{}) // replays the stream first
	if err != nil {
		t.Fatalf("cutover after replaying an order of a deleted customer: %v", err)
	}
	if m.Phase != shadow.CutOver {
		t.Fatalf("phase %s", m.Phase)
	}
	if got := scalar[string](db, `SELECT status FROM green.orders WHERE id = 7`); got != "after" {
		t.Fatalf("the change after the deleted order did not reach green (status %q)", got)
	}
	if n := scalar[int](db, `SELECT count(*) FROM green.orders WHERE id = 900001`); n != 0 {
		t.Fatal("the deleted order is in green")
	}
	if all, valid := db.foreignKeysOf("green.orders"); all != 1 || valid != 0 {
		t.Fatalf("after the cutover green has %d foreign keys, %d valid; want 1, not yet valid (finalize validates)", all, valid)
	}
	// The key is enforced through the view.
	if _, err := db.Pool.Exec(ctx, `INSERT INTO orders (customer_id, amount) VALUES (999999, 1)`); pgsql.Code(err) != "23503" {
		t.Fatalf("an order of a missing customer through the view: %v, want a foreign key violation", err)
	}
	if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if all, valid := db.foreignKeysOf("public.orders"); all != 1 || valid != 1 {
		t.Fatalf("after finalize orders has %d foreign keys, %d valid; want 1, valid", all, valid)
	}
}

// Issue 6, done-when 6: past the retained-WAL limit the migration stops with
// that reason and the slot is dropped.
func TestLogicalRetainedWALLimitStopsAndDropsSlot(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(30000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", Sync: shadow.SyncLogical,
		MaxRetainedWAL: 512 << 10, BatchSize: 2000})
	if err != nil {
		t.Fatal(err)
	}
	_, err = db.Runner.Drive(ctx, m.ID, shadow.Ready)
	if !errors.Is(err, sync.ErrWALLimit) && (err == nil || !strings.Contains(err.Error(), "retains")) {
		t.Fatalf("drive: %v, want the retained-WAL limit", err)
	}
	got, err := db.Runner.Store.Get(ctx, db.Pool, m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Phase != shadow.Failed || !strings.Contains(got.Error, "retains") {
		t.Fatalf("phase %s, error %q: want failed with the WAL reason", got.Phase, got.Error)
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_replication_slots WHERE database = current_database()`); n != 0 {
		t.Fatalf("%d slots left after the WAL limit", n)
	}
	if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
		t.Fatal(err)
	}
}

// A cutover with no applier running (no daemon, no `follow`) starts behind
// by everything written since ready. It catches green up in rounds before it
// takes its lock, so the application waits only for the last moments'
// changes: with one catch-up, the writes made during that catch-up were left
// for the lock (280–600 ms of hold on 2 cores, against 20–30 ms with an
// applier running).
func TestLogicalCutoverWithoutApplierCatchesUpInRounds(t *testing.T) {
	db, m := logicalOrdersAtReady(t, 20000)
	ctx := context.Background()
	w := startWorkload(t, db.DSN, 4)
	w.waitRunning()
	w.waitOps(5000) // a backlog that nobody applies
	m, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	lc := m.State.LastCutover
	t.Logf("cutover: %s", lc.Summary())
	if lc.DrainRounds < 2 {
		t.Errorf("green caught up in %d round(s) before the lock; a backlog with writes going on takes more", lc.DrainRounds)
	}
	if lc.CatchUpUnderLockMS <= 0 || lc.CatchUpUnderLockMS > lc.LockHoldMS {
		t.Errorf("the catch-up under the lock took %.1f ms, the hold %.1f ms", lc.CatchUpUnderLockMS, lc.LockHoldMS)
	}
	w.waitOps(500) // writes go on through the view
	w.stopAndCheck(t)
	db.assertGreenMatches(`SELECT id, customer_id, amount::numeric(12,2), status FROM `+m.State.Plan.Reverse.Target.Quoted(),
		`SELECT id, customer_id, amount, status FROM green.orders`)
}

// Logical sync copies green with no index at all, its key included (only
// the copy writes green until it is done, so no row can arrive twice), then
// builds the key and the rest; the stream is not applied before they exist.
func TestLogicalGreenIndexesBuiltAfterTheCopy(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(3000)
	ctx := context.Background()
	greenIndexes := func(ctx context.Context) []string {
		var names []string
		if err := db.Pool.QueryRow(ctx, `SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}')
			FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'green.orders'::regclass AND i.indisvalid`).Scan(&names); err != nil {
			t.Errorf("green's indexes: %v", err)
		}
		return names
	}
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", Sync: shadow.SyncLogical, BatchSize: 500})
	if err != nil {
		t.Fatal(err)
	}
	var once gosync.Once
	var duringCopy []string
	db.Runner.Failpoints.CopyBatch = func(ctx context.Context, r backfill.Range) error {
		once.Do(func() { duringCopy = greenIndexes(ctx) })
		return nil
	}
	var followErr error
	db.Runner.Failpoints.AfterPhase = func(ctx context.Context, to shadow.Phase) error {
		if to == shadow.Verifying {
			// Bounded: a follower that is let through runs until the
			// migration moves on.
			fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			followErr = db.Runner.Follow(fctx, m.ID)
		}
		return nil
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	if duringCopy == nil || len(duringCopy) != 0 {
		t.Errorf("green's indexes during the copy: %v, want none", duringCopy)
	}
	if followErr == nil || !strings.Contains(followErr.Error(), "building green's indexes") {
		t.Errorf("follow before green's indexes were built: %v, want a refusal", followErr)
	}
	want := []string{"orders_created_at_idx", "orders_customer_id_idx", "orders_pkey"}
	if got := greenIndexes(ctx); !slices.Equal(got, want) {
		t.Errorf("green's indexes at ready: %v, want %v", got, want)
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_constraint WHERE conrelid = 'green.orders'::regclass AND contype = 'p' AND conname = 'orders_pkey'`); n != 1 {
		t.Errorf("green has %d primary keys named orders_pkey, want 1", n)
	}
	db.assertGreenMatches(`SELECT id, customer_id, amount::numeric(12,2), status FROM orders`, `SELECT id, customer_id, amount, status FROM green.orders`)
	if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
		t.Fatal(err)
	}
}

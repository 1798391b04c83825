package integration

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// startKilledDuringSlotCreation runs `shadowctl start --sync logical` and
// kills it (SIGKILL) while PostgreSQL is still creating the migration's
// replication slot: an open transaction elsewhere keeps the slot from
// reaching its consistent point, so the process is caught inside
// CREATE_REPLICATION_SLOT. It returns the migration's ID once the killed
// process's WAL sender has ended, with that transaction ended.
func startKilledDuringSlotCreation(t *testing.T, db *testDB) string {
	t.Helper()
	ctx := context.Background()
	db.createOrders(5000)

	// A transaction with an xid, left open: a new logical slot waits for it.
	blocker, err := pgx.Connect(ctx, db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close(context.WithoutCancel(ctx))
	tx, err := blocker.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if _, err := tx.Exec(ctx, `SELECT pg_current_xact_id()`); err != nil {
		t.Fatal(err)
	}

	const id = "crash-at-slot"
	cmd := exec.Command(shadowctlBinary(t), "--dsn", db.DSN, "--log-level", "warn",
		"start", "--table", "orders", "--alter", "ALTER COLUMN amount TYPE numeric(12,2)", "--sync", "logical", "--name", id)
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	waitFor(t, "the start to be creating its replication slot", time.Minute, func() (bool, error) {
		select {
		case err := <-exited:
			t.Fatalf("shadowctl start exited (%v) before it was caught creating the slot", err)
		default:
		}
		var creating bool
		err := db.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'walsender' AND query LIKE 'CREATE_REPLICATION_SLOT%')`).Scan(&creating)
		return creating, err
	})
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-exited
	// The WAL sender notices its client is gone only once the wait ends:
	// it then finishes the slot and fails to answer. The slot it leaves
	// (a finished one is kept; the server drops only a slot that never
	// became consistent) is the attempt's leftover a restart must handle.
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the killed start's WAL sender to end", time.Minute, func() (bool, error) {
		var n int
		err := db.Pool.QueryRow(ctx, `SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'walsender'`).Scan(&n)
		return n == 0, err
	})
	t.Logf("left by the kill: %d replication slots", scalar[int](db, `SELECT count(*)::int FROM pg_replication_slots`))

	// What the crash left, and what status says of it.
	m, err := db.Runner.Store.Get(ctx, db.Pool, id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Phase != shadow.Preparing {
		t.Fatalf("after the kill the migration is %s, want preparing", m.Phase)
	}
	if pubs := scalar[int](db, `SELECT count(*)::int FROM pg_publication`); pubs != 1 {
		t.Fatalf("after the kill: %d publications, want the 1 created before the slot", pubs)
	}
	st := runCLI(t, nil, "--dsn", db.DSN, "status", id)
	if !strings.Contains(st.Stdout, "preparing") {
		t.Fatalf("status after the kill does not say preparing:\n%s%s", st.Stdout, st.Stderr)
	}
	return id
}

// A process killed while PostgreSQL creates the slot leaves a publication
// (and, killed a moment later, the slot) and a migration in preparing;
// driving it again drops what the attempt left, makes both anew and reaches
// ready, and the cutover finds green equal to blue.
func TestKillDuringSlotCreationThenResume(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	id := startKilledDuringSlotCreation(t, db)
	t.Cleanup(func() { _ = db.Runner.Abort(context.WithoutCancel(ctx), id, "") })
	// A crash a moment later, after the slot was made but before the
	// catalog recorded it, leaves the slot too: make it, under the name
	// the attempt gave its publication.
	db.exec(`SELECT pg_create_logical_replication_slot(pubname, 'pgoutput') FROM pg_publication`)

	m, err := db.Runner.Drive(ctx, id, shadow.Ready)
	if err != nil {
		t.Fatalf("drive after the kill: %v", err)
	}
	if m.Phase != shadow.Ready {
		t.Fatalf("phase %s after the drive, want ready", m.Phase)
	}
	if slots, pubs := scalar[int](db, `SELECT count(*)::int FROM pg_replication_slots`), scalar[int](db, `SELECT count(*)::int FROM pg_publication`); slots != 1 || pubs != 1 {
		t.Fatalf("after the resumed drive: %d slots and %d publications, want 1 and 1", slots, pubs)
	}
	// The new slot streams: writes after ready reach green by the cutover,
	// which applies everything before it swaps.
	db.exec(`UPDATE orders SET amount = amount + 1 WHERE id <= 100`, `DELETE FROM orders WHERE id BETWEEN 200 AND 210`)
	if m, err = db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); err != nil {
		t.Fatalf("cutover after the resumed drive: %v", err)
	}
	parked := pgsql.QualifiedName{Schema: "public", Name: m.State.Plan.Names.ParkedBlue}
	db.assertGreenMatches(`SELECT id, amount::numeric(12,2) FROM `+parked.Quoted(), `SELECT id, amount FROM green.orders`)
	if n := scalar[int](db, `SELECT count(*)::int FROM green.orders WHERE id BETWEEN 200 AND 210`); n != 0 {
		t.Fatalf("green still has %d of the rows deleted after ready", n)
	}
}

// The same crash, then abort: nothing of the migration is left (the test's
// cleanup checks slots and publications; green is checked here).
func TestKillDuringSlotCreationThenAbort(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	id := startKilledDuringSlotCreation(t, db)
	if err := db.Runner.Abort(ctx, id, "crashed while creating the slot"); err != nil {
		t.Fatalf("abort after the kill: %v", err)
	}
	if n := scalar[int](db, `SELECT count(*)::int FROM pg_class WHERE relnamespace = to_regnamespace('green')`); n != 0 {
		t.Fatalf("abort after the kill left %d relations in schema green", n)
	}
	if pubs := scalar[int](db, `SELECT count(*)::int FROM pg_publication`); pubs != 0 {
		t.Fatalf("abort after the kill left %d publications", pubs)
	}
}

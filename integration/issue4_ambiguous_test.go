package integration

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 4, done-when 6: a connection killed during the swap's COMMIT leaves a
// state that status reports truthfully and that the next cutover or rollback
// completes correctly, never swapping twice.

// terminator kills the swap's own backend from another connection, waiting
// until it is gone, just before the swap's COMMIT. With commitFirst, the
// swap's transaction is committed first: the COMMIT succeeded but its answer
// was lost.
type terminator struct {
	db    *testDB
	conn  *pgx.Conn
	fired int
}

func newTerminator(db *testDB) *terminator {
	return &terminator{db: db, conn: db.connectAs("")}
}

func (k *terminator) beforeCommit(commitFirst bool) func(ctx context.Context, tx pgx.Tx) error {
	return func(ctx context.Context, tx pgx.Tx) error {
		k.fired++
		pid := tx.Conn().PgConn().PID()
		if commitFirst {
			if err := tx.Commit(ctx); err != nil {
				return fmt.Errorf("failpoint: commit: %w", err)
			}
		}
		var gone bool
		if err := k.conn.QueryRow(ctx, `SELECT pg_terminate_backend($1, 10000)`, int64(pid)).Scan(&gone); err != nil || !gone {
			return fmt.Errorf("failpoint: terminate the swap's backend %d: %v (terminated: %v)", pid, err, gone)
		}
		return nil
	}
}

// swapEvents counts the recorded swaps of a kind (each successful cutover
// or rollback records one).
func (db *testDB) swapEvents(id, kind string) int {
	db.t.Helper()
	evs, err := db.Runner.Store.Events(context.Background(), id)
	if err != nil {
		db.t.Fatal(err)
	}
	n := 0
	for _, e := range evs {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

// assertSwappedOnce checks the shape a single cutover leaves: public.<table> a
// view over green, blue parked once under its parked name, green in place.
func (db *testDB) assertSwappedOnce(m *shadow.Migration) {
	db.t.Helper()
	parked := pgsql.QualifiedName{Schema: m.Table.Schema, Name: m.State.Plan.Names.ParkedBlue}
	if k := db.relkind(parked.Quoted()); k != "r" {
		db.t.Fatalf("parked blue %s has relkind %q, want a table", parked, k)
	}
	if k := db.relkind(m.State.Plan.Forward.Target.Quoted()); k != "r" {
		db.t.Fatalf("green %s has relkind %q", m.State.Plan.Forward.Target, k)
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v') AND relname <> 'customers'`); n != 2 {
		db.t.Fatalf("%d tables and views in public besides customers, want the view and parked blue", n)
	}
}

func TestIssue4AmbiguousCommitKilledConnection(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	// The application writes throughout: a swap killed at COMMIT must not
	// cost it a write or an error.
	w := startWorkload(t, db.DSN, 3)
	w.waitRunning()
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}
	k := newTerminator(db)

	// The cutover's connection dies before COMMIT: nothing happened, and the
	// cutover says so.
	_, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{BeforeCommit: k.beforeCommit(false)})
	if k.fired != 1 {
		t.Fatalf("the failpoint fired %d times, want once", k.fired)
	}
	if !errors.Is(err, cutover.ErrAmbiguousCommit) {
		t.Fatalf("cutover whose connection died at COMMIT: err %v, want ErrAmbiguousCommit", err)
	}
	t.Logf("cutover reported: %v", err)
	db.assertServes(id, orders, shadow.Ready, "blue")
	if n := db.swapEvents(id, "cutover"); n != 0 {
		t.Fatalf("%d cutover events recorded for a cutover that did not happen", n)
	}
	// The next cutover completes.
	w.waitOps(50)
	m, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{})
	if err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("the cutover after the killed one: %v", err)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	db.assertSwappedOnce(m)

	// Same for the rollback.
	w.waitOps(50)
	_, err = db.Runner.Rollback(ctx, id, shadow.CutoverOptions{BeforeCommit: k.beforeCommit(false)})
	if !errors.Is(err, cutover.ErrAmbiguousCommit) || k.fired != 2 {
		t.Fatalf("rollback whose connection died at COMMIT: err %v (failpoint fired %d), want ErrAmbiguousCommit", err, k.fired)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	db.assertSwappedOnce(m)
	if m, err = db.Runner.Rollback(ctx, id, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.RolledBack {
		t.Fatalf("the rollback after the killed one: %v", err)
	}
	db.assertServes(id, orders, shadow.RolledBack, "blue")

	// And finalize: killed, it is to be run again, green still serving.
	w.waitOps(50)
	if m, err = db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("cutover again: %v", err)
	}
	_, err = db.Runner.Finalize(ctx, id, 0, true, shadow.CutoverOptions{BeforeCommit: k.beforeCommit(false)})
	if !errors.Is(err, cutover.ErrAmbiguousCommit) || k.fired != 3 {
		t.Fatalf("finalize whose connection died at COMMIT: err %v (failpoint fired %d)", err, k.fired)
	}
	// It did not happen: cut over as before (a rollback is still possible).
	db.assertServes(id, orders, shadow.CutOver, "green")
	if m, err = db.Runner.Finalize(ctx, id, 0, true, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.Finalized {
		t.Fatalf("finalize after the killed one: %v", err)
	}
	if k := db.relkind(orders.Quoted()); k != "r" {
		t.Fatalf("public.orders has relkind %q after finalize", k)
	}
	w.stopAndCheck(t)
	if n, r := db.swapEvents(id, "cutover"), db.swapEvents(id, "rollback"); n != 2 || r != 1 {
		t.Fatalf("%d cutover and %d rollback events, want 2 and 1", n, r)
	}
}

// The swap committed but its answer was lost (the failpoint commits, then
// kills the connection): the runner must find out that it happened, say so,
// and refuse to do it again.
func TestIssue4AmbiguousCommitLostAnswer(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}
	k := newTerminator(db)

	m, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{BeforeCommit: k.beforeCommit(true)})
	if k.fired != 1 {
		t.Fatalf("the failpoint fired %d times", k.fired)
	}
	if err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("a cutover that committed (answer lost): err %v, phase %v; want it reported done", err, m)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	db.assertSwappedOnce(m)
	if m.State.LastCutover == nil || m.State.LastCutover.Kind != "cutover" {
		t.Fatalf("last cutover is %+v", m.State.LastCutover)
	}
	// The re-pointed foreign keys etc. aside, a second cutover refuses.
	if _, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); !errors.Is(err, shadow.ErrWrongPhase) {
		t.Fatalf("a second cutover: %v, want ErrWrongPhase", err)
	}
	db.assertSwappedOnce(m)

	m, err = db.Runner.Rollback(ctx, id, shadow.CutoverOptions{BeforeCommit: k.beforeCommit(true)})
	if err != nil || m.Phase != shadow.RolledBack || k.fired != 2 {
		t.Fatalf("a rollback that committed (answer lost): err %v, phase %v", err, m)
	}
	db.assertServes(id, orders, shadow.RolledBack, "blue")
	if _, err := db.Runner.Rollback(ctx, id, shadow.CutoverOptions{}); !errors.Is(err, shadow.ErrWrongPhase) {
		t.Fatalf("a second rollback: %v, want ErrWrongPhase", err)
	}
	db.assertServes(id, orders, shadow.RolledBack, "blue")
	if n, r := db.swapEvents(id, "cutover"), db.swapEvents(id, "rollback"); n != 1 || r != 1 {
		t.Fatalf("%d cutover and %d rollback events, want 1 and 1", n, r)
	}

	// Finalize likewise: it happened, so it must not be reported as "the
	// migration stays cut over".
	if m, err = db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("cutover again: %v", err)
	}
	m, err = db.Runner.Finalize(ctx, id, 0, true, shadow.CutoverOptions{BeforeCommit: k.beforeCommit(true)})
	if err != nil || m.Phase != shadow.Finalized || k.fired != 3 {
		t.Fatalf("a finalize that committed (answer lost): err %v, migration %v", err, m)
	}
	if kind, green := db.relkind(orders.Quoted()), db.relkind(m.State.Plan.Forward.Target.Quoted()); kind != "r" || green != "" {
		t.Fatalf("after finalize public.orders has relkind %q and green %q", kind, green)
	}
	if m, err = db.Runner.Finalize(ctx, id, 0, true, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.Finalized {
		t.Fatalf("finalize again: %v", err)
	}
}

// A process that died in the middle of a swap leaves the intermediate phase
// in the catalog; what the database serves settles it.
func TestIssue4ReconcileInterruptedSwap(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}
	setPhase := func(p shadow.Phase) {
		t.Helper()
		db.exec(fmt.Sprintf(`UPDATE %s SET phase = %s WHERE id = %s`, db.Runner.Store.Cat.T("migrations"), pgsql.Literal(string(p)), pgsql.Literal(id)))
		// Status reports the phase the catalog holds, and what serves.
		if st := shadow.StatusOf(db.get(id), timeNow()); st.Phase != string(p) {
			t.Fatalf("status says %s, want %s", st.Phase, p)
		}
	}

	// cutting_over while blue serves: the cutover had not happened; the
	// next cutover settles back to ready and proceeds.
	setPhase(shadow.CuttingOver)
	if st := shadow.StatusOf(db.get(id), timeNow()); st.Serving != "blue" {
		t.Fatalf("status says %s serves while blue does", st.Serving)
	}
	m, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{})
	if err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("cutover from an interrupted cutting_over (blue serving): %v", err)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	db.assertSwappedOnce(m)

	// cutting_over while green serves: it had happened; settle to cut_over
	// and refuse to swap again.
	setPhase(shadow.CuttingOver)
	if _, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); !errors.Is(err, shadow.ErrWrongPhase) {
		t.Fatalf("cutover from an interrupted cutting_over (green serving): %v, want ErrWrongPhase", err)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	db.assertSwappedOnce(m)

	// rolling_back while green serves: the rollback had not happened; the
	// next rollback settles to cut_over and proceeds.
	setPhase(shadow.RollingBack)
	if m, err = db.Runner.Rollback(ctx, id, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.RolledBack {
		t.Fatalf("rollback from an interrupted rolling_back (green serving): %v", err)
	}
	db.assertServes(id, orders, shadow.RolledBack, "blue")

	// rolling_back while blue serves: it had happened; settle to
	// rolled_back and do not roll back again.
	setPhase(shadow.RollingBack)
	if _, err := db.Runner.Rollback(ctx, id, shadow.CutoverOptions{}); !errors.Is(err, shadow.ErrWrongPhase) {
		t.Fatalf("rollback from an interrupted rolling_back (blue serving): %v, want ErrWrongPhase", err)
	}
	db.assertServes(id, orders, shadow.RolledBack, "blue")

	// cutting_over after a rollback, blue serving: back to rolled_back, and
	// the cutover proceeds.
	setPhase(shadow.CuttingOver)
	if m, err = db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("cutover from an interrupted cutting_over after a rollback: %v", err)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	db.assertSwappedOnce(m)
	if n, r := db.swapEvents(id, "cutover"), db.swapEvents(id, "rollback"); n != 2 || r != 1 {
		t.Fatalf("%d cutover and %d rollback events, want 2 and 1", n, r)
	}
}

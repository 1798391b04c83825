package integration

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 3, done-when 5: abort in each phase where blue serves (pending,
// preparing, copying mid-copy with the driver running, verifying, ready,
// rolled_back, failed) leaves the database schema identical to before the
// start — a full fingerprint: tables, columns, defaults, indexes,
// constraints with their validation state, triggers, functions, sequences
// and their owners, grants, comments, schemas — and no tool object but the
// catalog. Abort is refused while green serves.
func TestIssue3AbortAtEachPhase(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(3000)
	db.exec(
		`CREATE TABLE order_notes (id int PRIMARY KEY, order_id int REFERENCES orders, note text)`,
		`INSERT INTO order_notes SELECT g, g, 'note' FROM generate_series(1, 100) g`,
		`ALTER TABLE orders ADD CONSTRAINT amount_nonneg CHECK (amount >= 0)`,
		`CREATE FUNCTION orders_touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.status := coalesce(NEW.status, 'new'); RETURN NEW; END$$`,
		`CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION orders_touch()`,
		`GRANT SELECT, INSERT ON orders TO PUBLIC`,
		`COMMENT ON TABLE orders IS 'the orders'`,
		`COMMENT ON COLUMN orders.amount IS 'in euros'`,
	)
	ctx := context.Background()
	before := dbFingerprint(t, db, "shadowctl")
	req := shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint", BatchSize: 500, Workers: 1}

	check := func(t *testing.T, id string) {
		t.Helper()
		m, err := db.Runner.Store.Get(ctx, db.Pool, id)
		if err != nil {
			t.Fatal(err)
		}
		if m.Phase != shadow.Aborted {
			t.Fatalf("phase %s after abort, want aborted", m.Phase)
		}
		if n := scalar[int](db, `SELECT count(*) FROM shadowctl.copy_ranges WHERE migration_id = $1`, id); n != 0 {
			t.Fatalf("%d copy ranges left in the catalog", n)
		}
		assertSameSchema(t, "after abort", before, dbFingerprint(t, db, "shadowctl"))
		assertNoToolObjects(t, db, "green")
	}
	submit := func(t *testing.T) *shadow.Migration {
		t.Helper()
		db.Runner.Failpoints = shadow.Failpoints{}
		m, err := db.Runner.Submit(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	phaseOf := func(t *testing.T, id string) shadow.Phase {
		t.Helper()
		m, err := db.Runner.Store.Get(ctx, db.Pool, id)
		if err != nil {
			t.Fatal(err)
		}
		return m.Phase
	}
	abort := func(t *testing.T, m *shadow.Migration, want shadow.Phase) {
		t.Helper()
		if p := phaseOf(t, m.ID); p != want {
			t.Fatalf("phase %s before abort, want %s", p, want)
		}
		if err := db.Runner.Abort(ctx, m.ID, "test"); err != nil {
			t.Fatalf("abort in %s: %v", want, err)
		}
		check(t, m.ID)
	}

	t.Run("pending", func(t *testing.T) {
		abort(t, submit(t), shadow.Pending)
	})
	t.Run("preparing", func(t *testing.T) {
		m := submit(t)
		dctx, cancel := context.WithCancel(ctx)
		defer cancel()
		db.Runner.Failpoints.AfterPhase = func(ctx context.Context, to shadow.Phase) error {
			if to == shadow.Preparing { // green is built, the sync is not installed yet
				cancel()
				return ctx.Err()
			}
			return nil
		}
		if _, err := db.Runner.Drive(dctx, m.ID, shadow.Ready); !errors.Is(err, context.Canceled) {
			t.Fatalf("drive: %v, want canceled in preparing", err)
		}
		if n := scalar[int](db, `SELECT count(*) FROM pg_class WHERE oid = to_regclass('green.orders')`); n != 1 {
			t.Fatal("green was not built before the interruption: the case tests nothing")
		}
		abort(t, m, shadow.Preparing)
	})
	t.Run("copying", func(t *testing.T) {
		m := submit(t)
		paused, release := make(chan struct{}), make(chan struct{})
		batches := 0
		db.Runner.Failpoints.CopyBatch = func(ctx context.Context, r backfill.Range) error {
			if batches++; batches == 2 {
				close(paused)
				<-release
			}
			return nil
		}
		drive := make(chan error, 1)
		go func() { _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); drive <- err }()
		<-paused
		aborted := make(chan error, 1)
		go func() { aborted <- db.Runner.Abort(ctx, m.ID, "test") }()
		waitFor(t, "the abort to be recorded", 20*time.Second, func() (bool, error) {
			return phaseOf(t, m.ID) == shadow.Aborting, nil
		})
		close(release) // the batch commits; the driver sees the abort before the next one
		if err := <-drive; !errors.Is(err, shadow.ErrStopped) {
			t.Fatalf("drive: %v, want ErrStopped", err)
		}
		if err := <-aborted; err != nil {
			t.Fatalf("abort while copying: %v", err)
		}
		check(t, m.ID)
	})
	t.Run("verifying", func(t *testing.T) {
		m := submit(t)
		if _, err := db.Runner.Drive(ctx, m.ID, shadow.Verifying); err != nil {
			t.Fatal(err)
		}
		abort(t, m, shadow.Verifying)
	})
	t.Run("ready", func(t *testing.T) {
		m := submit(t)
		if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
			t.Fatal(err)
		}
		abort(t, m, shadow.Ready)
	})
	t.Run("rolled_back", func(t *testing.T) {
		m := submit(t)
		if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := db.Runner.Abort(ctx, m.ID, "test"); !errors.Is(err, shadow.ErrWrongPhase) {
			t.Fatalf("abort while green serves: %v, want ErrWrongPhase", err)
		}
		if _, err := db.Runner.Rollback(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
			t.Fatal(err)
		}
		abort(t, m, shadow.RolledBack)
	})
	// Last: the TRUNCATE empties the tables.
	t.Run("failed", func(t *testing.T) {
		m := submit(t)
		if _, err := db.Runner.Drive(ctx, m.ID, shadow.Verifying); err != nil {
			t.Fatal(err)
		}
		db.exec(`TRUNCATE orders CASCADE`)
		if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err == nil {
			t.Fatal("a migration whose blue was truncated reached ready")
		}
		abort(t, m, shadow.Failed)
	})
}

// A failure in preparing after green was built (here a failpoint; in life,
// the sync's lock not granted within the setup timeout) is recorded: the
// catalog says failed with the error, not preparing; abort then restores the
// schema.
func TestIssue3FailureInPreparingIsRecorded(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 100)
	ctx := context.Background()
	before := dbFingerprint(t, db, "shadowctl")
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint"})
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("injected failure after green was built")
	db.Runner.Failpoints.AfterPhase = func(ctx context.Context, to shadow.Phase) error {
		if to == shadow.Preparing {
			return boom
		}
		return nil
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); !errors.Is(err, boom) {
		t.Fatalf("drive: %v, want the injected failure", err)
	}
	got, err := db.Runner.Store.Get(ctx, db.Pool, m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Phase != shadow.Failed || !strings.Contains(got.Error, boom.Error()) {
		t.Fatalf("catalog says %s / %q, want failed with the error", got.Phase, got.Error)
	}
	if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
		t.Fatal(err)
	}
	assertSameSchema(t, "after abort", before, dbFingerprint(t, db, "shadowctl"))
	assertNoToolObjects(t, db, "green")
}

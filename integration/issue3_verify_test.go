package integration

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 3, done-when 4: verification catches one green row changed, one
// deleted and one added behind the tool's back, names the chunk, repairs what
// can be repaired, and a difference that persists fails the migration before
// ready.
func TestIssue3VerificationCatchesTampering(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 1000) // keys 2, 4, ..., 2000
	ctx := context.Background()
	blue, green := `SELECT id, v, n::bigint FROM public.items`, `SELECT id, v, n FROM green.items`
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint", BatchSize: 300})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Verifying); err != nil {
		t.Fatal(err)
	}
	db.assertGreenMatches(blue, green)

	// Changed between the copy and the verification: the verifier repairs
	// the chunks and the migration becomes ready, exact.
	t.Run("repaired before ready", func(t *testing.T) {
		db.exec(`UPDATE green.items SET v = 'tampered' WHERE id = 500`,
			`DELETE FROM green.items WHERE id = 1000`,
			`INSERT INTO green.items VALUES (1001, 'extra', 0)`)
		got, err := db.Runner.Drive(ctx, m.ID, shadow.Ready)
		if err != nil {
			t.Fatal(err)
		}
		if got.Phase != shadow.Ready {
			t.Fatalf("phase %s", got.Phase)
		}
		v := verifyResult(t, db, m.ID)
		if v["mismatched_chunks"].(float64) < 1 || v["repaired_chunks"].(float64) < 1 || v["ok"] != true {
			t.Fatalf("verify result %v: want a mismatch found and repaired", v)
		}
		db.assertGreenMatches(blue, green)
	})

	// On the ready migration, the verifier alone (no repair) reports each
	// kind of difference with the chunk that holds it.
	mig, err := db.Runner.Store.Get(ctx, db.Pool, m.ID)
	if err != nil {
		t.Fatal(err)
	}
	verifier := func() *cutover.Verifier {
		return &cutover.Verifier{Pool: db.Pool, Mapping: mig.State.Plan.Forward, ChunkRows: 100, Workers: 2, Chunked: true, Log: zerolog.Nop()}
	}
	if res, err := verifier().Run(ctx); err != nil || !res.OK || res.Chunks != 11 || res.Rows != 1000 {
		t.Fatalf("untouched: %+v, %v; want 1000 rows in 11 chunks, ok", res, err)
	}
	for _, c := range []struct {
		name, tamper, undo, chunk string
	}{
		{"one row changed", `UPDATE green.items SET v = 'tampered' WHERE id = 500`, `UPDATE green.items SET v = 'v500' WHERE id = 500`,
			"keys (400, 600]: blue 100 rows, green 100 rows, same count but different values"},
		{"one row deleted", `DELETE FROM green.items WHERE id = 1000`, `INSERT INTO green.items VALUES (1000, 'v1000', 500)`,
			"keys (800, 1000]: blue 100 rows, green 99 rows"},
		{"one row added", `INSERT INTO green.items VALUES (1001, 'extra', 0)`, `DELETE FROM green.items WHERE id = 1001`,
			"keys (1000, 1200]: blue 100 rows, green 101 rows"},
		{"one row added past the end", `INSERT INTO green.items VALUES (5000, 'extra', 0)`, `DELETE FROM green.items WHERE id = 5000`,
			"keys (2000, ∞]: blue 0 rows, green 1 rows"},
	} {
		t.Run(c.name, func(t *testing.T) {
			db.exec(c.tamper)
			res, err := verifier().Run(ctx)
			if !errors.Is(err, cutover.ErrMismatch) {
				t.Fatalf("verify after %q: %v, want ErrMismatch", c.tamper, err)
			}
			if res.OK || res.Mismatched != 1 || res.FirstMismatch != c.chunk || !strings.Contains(err.Error(), c.chunk) {
				t.Fatalf("verify after %q: %+v (%v); want one mismatched chunk %q", c.tamper, res, err, c.chunk)
			}
			db.exec(c.undo)
			if res, err := verifier().Run(ctx); err != nil || !res.OK {
				t.Fatalf("after undoing %q: %+v, %v", c.tamper, res, err)
			}
		})
	}

	// A difference that repair cannot fix (a trigger on green keeps
	// corrupting one row): the migration fails, names the chunk, and never
	// reaches ready.
	t.Run("persists after repair", func(t *testing.T) {
		if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
			t.Fatal(err)
		}
		m2, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Runner.Drive(ctx, m2.ID, shadow.Verifying); err != nil {
			t.Fatal(err)
		}
		db.exec(`CREATE FUNCTION public.corrupt() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.v := 'corrupted'; RETURN NEW; END$$`,
			`CREATE TRIGGER corrupt BEFORE INSERT OR UPDATE ON green.items FOR EACH ROW WHEN (NEW.id = 500) EXECUTE FUNCTION public.corrupt()`,
			`UPDATE green.items SET v = v WHERE id = 500`)
		got, err := db.Runner.Drive(ctx, m2.ID, shadow.Ready)
		if !errors.Is(err, cutover.ErrMismatch) {
			t.Fatalf("drive: %v, want ErrMismatch", err)
		}
		if got == nil || got.Phase == shadow.Ready {
			t.Fatalf("the migration reached ready with a persistent difference")
		}
		cur, err := db.Runner.Store.Get(ctx, db.Pool, m2.ID)
		if err != nil {
			t.Fatal(err)
		}
		if cur.Phase != shadow.Failed || !strings.Contains(cur.Error, "after repair") || !strings.Contains(cur.Error, "keys (") {
			t.Fatalf("catalog: phase %s, error %q; want failed naming the chunk", cur.Phase, cur.Error)
		}
		if err := db.Runner.Abort(ctx, m2.ID, ""); err != nil {
			t.Fatal(err)
		}
		db.exec(`DROP FUNCTION public.corrupt()`)
		assertNoToolObjects(t, db, "green")
	})
}

// The verifier (without repair) never reports a false difference while 4
// clients write through the table at ready: each chunk's two sides are read
// in one snapshot and the trigger sync is synchronous.
func TestIssue3VerifierConsistentUnderWrites(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(6000)
	ctx := context.Background()
	w := startWorkload(t, db.DSN, 4)
	w.waitRunning()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", BatchSize: 1000})
	if err != nil {
		t.Fatal(err)
	}
	m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		w.waitOps(50)
		v := &cutover.Verifier{Pool: db.Pool, Mapping: m.State.Plan.Forward, ChunkRows: 500, Workers: 3, Chunked: true, Log: zerolog.Nop()}
		res, err := v.Run(ctx)
		if err != nil || !res.OK || res.Chunks < 10 {
			t.Fatalf("verification %d under writes: %+v, %v", i+1, res, err)
		}
	}
	w.stopAndCheck(t)
	db.assertGreenMatches(
		`SELECT id, customer_id, customer_name, amount::numeric(12,2), status, created_at FROM public.orders`,
		`SELECT id, customer_id, customer_name, amount, status, created_at FROM green.orders`)
}

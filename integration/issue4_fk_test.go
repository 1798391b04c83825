package integration

import (
	"context"
	"fmt"
	"testing"

	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// fkShape is what makes a foreign key behave as it does, apart from the
// table it references.
type fkShape struct {
	Count                       int
	UpdType, DelType, MatchType string
	Deferrable, Deferred        bool
	Columns, RefColumns         string
	ReferencedOID, WantOID      uint32
	Validated                   bool
}

// Issue 4, done-when 3: a child table referencing orders with ON DELETE
// CASCADE behaves the same before the cutover, after it, after a rollback and
// after finalize, while a workload writes through public.orders.
func TestIssue4InboundForeignKeys(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(3000)
	db.exec(`CREATE TABLE order_items (id serial PRIMARY KEY, order_id int NOT NULL REFERENCES orders ON DELETE CASCADE, sku text NOT NULL)`)
	ctx := context.Background()
	app := db.app()
	w := startWorkload(t, db.DSN, 4)
	w.waitRunning()

	// Parents with items that live through the whole lifecycle (so each
	// VALIDATE has rows to check). They are inserted after the workload's
	// snapshot, so no client owns (or re-keys) them; removed before the
	// workload's final check.
	var kept []int
	for i := 0; i < 5; i++ {
		id := scalar[int](app, `INSERT INTO public.orders (customer_id, amount) VALUES (1, 1) RETURNING id`)
		app.exec(fmt.Sprintf(`INSERT INTO order_items (order_id, sku) SELECT %d, 'kept-' || g FROM generate_series(1, 3) g`, id))
		kept = append(kept, id)
	}
	id := db.readyMigration("orders", "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint")
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}
	shape := func(serving string) fkShape {
		t.Helper()
		var s fkShape
		err := app.Pool.QueryRow(ctx, `
			SELECT count(*) OVER (), confupdtype::text, confdeltype::text, confmatchtype::text, condeferrable, condeferred,
			       (SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = conrelid AND attnum = ANY(conkey)),
			       (SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = confrelid AND attnum = ANY(confkey)),
			       confrelid::int8, to_regclass($1)::oid::int8, convalidated
			  FROM pg_constraint WHERE conrelid = 'public.order_items'::regclass AND contype = 'f'`, serving).
			Scan(&s.Count, &s.UpdType, &s.DelType, &s.MatchType, &s.Deferrable, &s.Deferred, &s.Columns, &s.RefColumns, &s.ReferencedOID, &s.WantOID, &s.Validated)
		if err != nil {
			t.Fatalf("read the foreign key: %v", err)
		}
		return s
	}
	before := shape("public.orders")
	check := func(stage, serving string) {
		t.Helper()
		// Deleting an order deletes its items.
		parent := scalar[int](app, `INSERT INTO public.orders (customer_id, amount) VALUES (2, 2) RETURNING id`)
		app.exec(fmt.Sprintf(`INSERT INTO order_items (order_id, sku) SELECT %d, 'x' || g FROM generate_series(1, 4) g`, parent))
		if n := scalar[int](app, `SELECT count(*) FROM order_items WHERE order_id = $1`, parent); n != 4 {
			t.Fatalf("%s: %d items inserted, want 4", stage, n)
		}
		if ct, err := app.Pool.Exec(ctx, `DELETE FROM public.orders WHERE id = $1`, parent); err != nil || ct.RowsAffected() != 1 {
			t.Fatalf("%s: delete order %d: %v (%d rows)", stage, parent, err, ct.RowsAffected())
		}
		if n := scalar[int](app, `SELECT count(*) FROM order_items WHERE order_id = $1`, parent); n != 0 {
			t.Errorf("%s: deleting order %d left %d of its items: ON DELETE CASCADE did not apply", stage, parent, n)
		}
		// An item for a missing order is refused.
		_, err := app.Pool.Exec(ctx, `INSERT INTO order_items (order_id, sku) VALUES (-1, 'orphan')`)
		if pgsql.Code(err) != "23503" {
			t.Errorf("%s: an item for a missing order: err %v, want a foreign-key violation (23503)", stage, err)
		}
		// An item for an order written through public.orders now is accepted.
		if _, err := app.Pool.Exec(ctx, `INSERT INTO order_items (order_id, sku) VALUES ($1, 'kept-new')`, kept[0]); err != nil {
			t.Errorf("%s: an item for an existing order: %v", stage, err)
		}
		// The constraint points at what serves, is validated, and is the same
		// constraint as before otherwise.
		s := shape(serving)
		if s.ReferencedOID != s.WantOID || !s.Validated {
			t.Errorf("%s: the foreign key references oid %d (validated %v), want %s (oid %d) validated", stage, s.ReferencedOID, s.Validated, serving, s.WantOID)
		}
		b := before
		b.ReferencedOID, b.WantOID, s.ReferencedOID, s.WantOID = 0, 0, 0, 0
		if s != b {
			t.Errorf("%s: the foreign key is %+v, was %+v", stage, s, b)
		}
	}
	db.assertServes(id, orders, shadow.Ready, "blue")
	check("before cutover", "public.orders")
	db.walkSwaps(id, orders, w, func(stage, serving string) {
		if serving == "green" {
			check(stage, "green.orders")
		} else {
			check(stage, "public.orders")
		}
	})

	// The kept items lived through every swap: 3 each, plus one per stage.
	if n := scalar[int](app, `SELECT count(*) FROM order_items WHERE order_id = ANY($1)`, kept); n != 3*len(kept)+5 {
		t.Errorf("%d items of the kept orders, want %d", n, 3*len(kept)+5)
	}
	if _, err := app.Pool.Exec(ctx, `DELETE FROM public.orders WHERE id = ANY($1)`, kept); err != nil {
		t.Fatal(err)
	}
	if n := scalar[int](app, `SELECT count(*) FROM order_items`); n != 0 {
		t.Errorf("%d items left after deleting every parent", n)
	}
	w.stopAndCheck(t)
}

// Trigger sync: green's own foreign keys are added NOT VALID when its indexes
// are built, so every write the sync makes is checked from then on, and
// their rows are validated at finalize rather than before ready or in the
// cutover command (the verification has shown green holds blue's rows,
// which blue's key checked).
func TestTriggerSyncGreenForeignKeyCheckedAtReadyValidatedAtFinalize(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)"})
	if err != nil {
		t.Fatal(err)
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	if all, valid := db.foreignKeysOf("green.orders"); all != 1 || valid != 0 {
		t.Fatalf("at ready green has %d foreign keys, %d valid; want 1, not yet valid", all, valid)
	}
	if _, err := db.Pool.Exec(ctx, `INSERT INTO green.orders (id, customer_id, amount) VALUES (900001, 999999, 1)`); pgsql.Code(err) != "23503" {
		t.Fatalf("an order of a missing customer written to green at ready: %v, want a foreign key violation", err)
	}
	if m, err = db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if all, valid := db.foreignKeysOf("green.orders"); all != 1 || valid != 0 {
		t.Fatalf("after the cutover green has %d foreign keys, %d valid; want 1, not yet valid", all, valid)
	}
	if _, err := db.Pool.Exec(ctx, `INSERT INTO orders (customer_id, amount) VALUES (999999, 1)`); pgsql.Code(err) != "23503" {
		t.Fatalf("an order of a missing customer through the view after the cutover: %v, want a foreign key violation", err)
	}
	if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if all, valid := db.foreignKeysOf("public.orders"); all != 1 || valid != 1 {
		t.Fatalf("after finalize orders has %d foreign keys, %d valid; want 1, valid", all, valid)
	}
}

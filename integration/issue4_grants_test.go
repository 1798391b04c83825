package integration

import (
	"context"
	"fmt"
	"testing"

	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 4, done-when 5: a role that may only SELECT and INSERT on orders
// (and use its id sequence) can do exactly that, through its own connection,
// before the cutover, after it, after a rollback and after finalize; a
// row-level security policy keeps applying to it throughout. A workload (as
// the owner, which RLS does not restrict) writes meanwhile.
func TestIssue4GrantsAndRLS(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	role := db.newRole("issue4_app")
	r := pgsql.Ident(role)
	db.exec(
		`ALTER TABLE orders ADD COLUMN tenant text NOT NULL DEFAULT 'w'`,
		`ALTER TABLE orders ENABLE ROW LEVEL SECURITY`,
		`CREATE POLICY tenant_isolation ON orders USING (tenant = current_setting('app.tenant', true))`,
		`GRANT SELECT, INSERT ON orders TO `+r,
		`GRANT USAGE ON SEQUENCE orders_id_seq TO `+r,
	)
	ctx := context.Background()
	app := db.app()
	w := startWorkload(t, db.DSN, 3)
	w.waitRunning()
	// Rows of tenants a and b, written after the workload's snapshot so no
	// client owns (or deletes) them; removed before the workload's check.
	app.exec(`INSERT INTO public.orders (customer_id, amount, tenant) SELECT 1, g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END FROM generate_series(1, 40) g`)
	id := db.readyMigration("orders", issue4Alter)
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}

	as := db.connectAs(role)
	check := func(stage string) {
		t.Helper()
		// Exactly SELECT and INSERT, as the catalog sees it.
		for priv, want := range map[string]bool{"SELECT": true, "INSERT": true, "UPDATE": false, "DELETE": false, "TRUNCATE": false, "REFERENCES": false, "TRIGGER": false} {
			if got := scalar[bool](db, `SELECT has_table_privilege($1, 'public.orders', $2)`, role, priv); got != want {
				t.Errorf("%s: has_table_privilege(%s, %s) = %v, want %v", stage, role, priv, got, want)
			}
		}
		for _, tenant := range []string{"a", "b"} {
			if _, err := as.Exec(ctx, fmt.Sprintf("SET app.tenant = %s", pgsql.Literal(tenant))); err != nil {
				t.Fatal(err)
			}
			// RLS: the role sees exactly its tenant's rows.
			want := scalar[int64](app, `SELECT count(*) FROM public.orders WHERE tenant = $1`, tenant)
			var n, others int64
			if err := as.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE tenant <> current_setting('app.tenant')) FROM public.orders`).Scan(&n, &others); err != nil {
				t.Fatalf("%s: SELECT as %s: %v", stage, role, err)
			}
			if n != want || others != 0 || want == 0 {
				t.Errorf("%s: tenant %s sees %d rows (%d of other tenants), want its %d", stage, tenant, n, others, want)
			}
			// INSERT with the serial default, for its own tenant.
			var newID int64
			if err := as.QueryRow(ctx, `INSERT INTO public.orders (customer_id, amount, tenant) VALUES (2, 9.5, $1) RETURNING id`, tenant).Scan(&newID); err != nil {
				t.Errorf("%s: INSERT as %s for tenant %s: %v", stage, role, tenant, err)
			}
			// Not for another tenant (the policy's check).
			other := map[string]string{"a": "b", "b": "a"}[tenant]
			if _, err := as.Exec(ctx, `INSERT INTO public.orders (customer_id, amount, tenant) VALUES (2, 9.5, $1)`, other); pgsql.Code(err) != "42501" {
				t.Errorf("%s: INSERT as tenant %s of a row for tenant %s: %v, want a row-level security violation (42501)", stage, tenant, other, err)
			}
			// Neither UPDATE nor DELETE, even of its own row.
			if _, err := as.Exec(ctx, `UPDATE public.orders SET amount = 1 WHERE id = $1`, newID); pgsql.Code(err) != "42501" {
				t.Errorf("%s: UPDATE as %s: %v, want permission denied (42501)", stage, role, err)
			}
			if _, err := as.Exec(ctx, `DELETE FROM public.orders WHERE id = $1`, newID); pgsql.Code(err) != "42501" {
				t.Errorf("%s: DELETE as %s: %v, want permission denied (42501)", stage, role, err)
			}
			if got := scalar[int64](app, `SELECT count(*) FROM public.orders WHERE id = $1 AND tenant = $2 AND amount = 9.5`, newID, tenant); got != 1 {
				t.Errorf("%s: the row inserted as %s (id %d) is not there unchanged", stage, role, newID)
			}
		}
	}
	check("before cutover")
	db.walkSwaps(id, orders, w, func(stage, _ string) { check(stage) })

	// After finalize the table itself carries the policy, enabled.
	if !scalar[bool](db, `SELECT relrowsecurity FROM pg_class WHERE oid = 'public.orders'::regclass`) {
		t.Error("row-level security is not enabled on public.orders after finalize")
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_policy WHERE polrelid = 'public.orders'::regclass AND polname = 'tenant_isolation'`); n != 1 {
		t.Errorf("%d tenant_isolation policies on public.orders after finalize", n)
	}
	if _, err := app.Pool.Exec(ctx, `DELETE FROM public.orders WHERE tenant <> 'w'`); err != nil {
		t.Fatal(err)
	}
	w.stopAndCheck(t)
}

// Column-level grants: a role that may read only some columns of orders can
// read exactly those through the view and after finalize. (Without RLS: a
// security_invoker view makes PostgreSQL check the invoker's rights on every
// column the view reads, which a column-level grantee does not have; with RLS
// on the table that combination cannot be served through a view at all.)
func TestIssue4ColumnGrants(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	colRole := db.newRole("issue4_cols")
	db.exec(`GRANT SELECT (id, amount, status) ON orders TO ` + pgsql.Ident(colRole))
	ctx := context.Background()
	id := db.readyMigration("orders", issue4Alter)
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}
	as := db.connectAs(colRole)
	check := func(stage string) {
		t.Helper()
		for col, want := range map[string]bool{"id": true, "amount": true, "status": true, "customer_name": false, "customer_id": false} {
			if got := scalar[bool](db, `SELECT has_column_privilege($1, 'public.orders', $2, 'SELECT')`, colRole, col); got != want {
				t.Errorf("%s: has_column_privilege(%s, %s, SELECT) = %v, want %v", stage, colRole, col, got, want)
			}
		}
		var n int64
		if err := as.QueryRow(ctx, `SELECT count(amount) FROM public.orders WHERE status IS NOT NULL`).Scan(&n); err != nil {
			t.Errorf("%s: SELECT of granted columns as %s: %v", stage, colRole, err)
		} else if want := scalar[int64](db, `SELECT count(amount) FROM public.orders WHERE status IS NOT NULL`); n != want || n == 0 {
			t.Errorf("%s: %s counted %d rows, want %d", stage, colRole, n, want)
		}
		for _, q := range []string{`SELECT customer_name FROM public.orders LIMIT 1`, `SELECT * FROM public.orders LIMIT 1`, `INSERT INTO public.orders (amount) VALUES (1)`} {
			if _, err := as.Exec(ctx, q); pgsql.Code(err) != "42501" {
				t.Errorf("%s: %s as %s: %v, want permission denied (42501)", stage, q, colRole, err)
			}
		}
	}
	step := func(name string, fn func() (*shadow.Migration, error), want shadow.Phase, serving string) {
		t.Helper()
		m, err := fn()
		if err != nil || m.Phase != want {
			t.Fatalf("%s: %v", name, err)
		}
		if want != shadow.Finalized {
			db.assertServes(id, orders, want, serving)
		}
		check(name)
	}
	check("before cutover")
	opts := shadow.CutoverOptions{}
	step("cutover", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, id, opts) }, shadow.CutOver, "green")
	step("rollback", func() (*shadow.Migration, error) { return db.Runner.Rollback(ctx, id, opts) }, shadow.RolledBack, "blue")
	step("cutover again", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, id, opts) }, shadow.CutOver, "green")
	step("finalize", func() (*shadow.Migration, error) { return db.Runner.Finalize(ctx, id, 0, true, opts) }, shadow.Finalized, "")
}

package integration

import (
	"context"
	"fmt"
	"testing"

	"github.com/shadowctl/shadowctl/shadow"
)

// Blue's own triggers serve the application whichever table serves it, and
// each fires once per write: an audit trigger sees every write exactly once
// at ready, after the cutover (on green; blue's copy is disabled, so the
// reverse sync's writes to blue are not audited twice), after a rollback
// (on blue again), after a second cutover, and after finalize (one trigger
// left, on the table that green became).
func TestUserTriggersFireOnceThroughTheLifecycle(t *testing.T) {
	forEachSyncMode(t, func(t *testing.T, mode shadow.SyncMode) {
		db := newTestDB(t)
		db.createOrders(1000)
		db.exec(`CREATE TABLE audit (op text NOT NULL, order_id bigint NOT NULL)`,
			`CREATE FUNCTION audit_orders() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN
				INSERT INTO audit VALUES (TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
				RETURN NULL;
			END $$`,
			`CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW EXECUTE FUNCTION audit_orders()`)
		ctx := context.Background()
		m := db.ready(shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", Sync: mode})
		// writes makes one insert, one update and one delete through
		// public.orders and checks that each was audited once.
		stage := 0
		writes := func(when string) {
			t.Helper()
			stage++
			before := scalar[int64](db, `SELECT count(*) FROM audit`)
			db.exec(`INSERT INTO orders (customer_id, customer_name, amount, status) VALUES (1, 'customer 1', 1.5, 'new')`,
				fmt.Sprintf(`UPDATE orders SET status = 'paid' WHERE id = %d`, 100+stage),
				fmt.Sprintf(`DELETE FROM orders WHERE id = %d`, 200+stage))
			got := scalar[string](db, `SELECT string_agg(op, ',' ORDER BY op) FROM (SELECT op FROM audit OFFSET $1) a`, before)
			if got != "DELETE,INSERT,UPDATE" {
				t.Fatalf("%s: audited %q, want each write once (DELETE,INSERT,UPDATE)", when, got)
			}
		}
		opts := shadow.CutoverOptions{}
		writes("at ready")
		if _, err := db.Runner.Cutover(ctx, m.ID, opts); err != nil {
			t.Fatal(err)
		}
		writes("after the cutover")
		if _, err := db.Runner.Rollback(ctx, m.ID, opts); err != nil {
			t.Fatal(err)
		}
		writes("after the rollback")
		if _, err := db.Runner.Cutover(ctx, m.ID, opts); err != nil {
			t.Fatal(err)
		}
		writes("after the second cutover")
		if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, opts); err != nil {
			t.Fatal(err)
		}
		writes("after finalize")
		if n := scalar[int](db, `SELECT count(*) FROM pg_trigger WHERE tgname = 'orders_audit'`); n != 1 {
			t.Fatalf("%d orders_audit triggers after finalize, want 1", n)
		}
		if on := scalar[string](db, `SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'orders_audit' AND tgrelid = 'public.orders'::regclass`); on != "O" {
			t.Fatalf("orders_audit on the final table is tgenabled=%s, want O", on)
		}
	})
}

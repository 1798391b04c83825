package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/shadow"
	"github.com/shadowctl/shadowctl/sync"
)

// With logical sync, green follows blue's rows through the stream. A
// TRUNCATE of blue, or a change of blue's definition, is something green can
// no longer follow: the follower stops, the migration fails and says why
// (the cutover does not verify again, so going on would serve a green that
// blue no longer matches), the cutover is refused, and abort removes
// everything the tool made, slot and publication included.
func TestLogicalStopsWhenBlueIsTruncatedOrAltered(t *testing.T) {
	for _, c := range []struct {
		name, sql string
		want      error
	}{
		{"truncate", `TRUNCATE orders`, sync.ErrTruncate},
		{"ddl", `ALTER TABLE orders ALTER COLUMN customer_name TYPE varchar(80); UPDATE orders SET status = 'paid' WHERE id = 1`, sync.ErrRelationChanged},
	} {
		t.Run(c.name, func(t *testing.T) {
			db := newTestDB(t)
			db.createOrders(2000)
			before := dbFingerprint(t, db, "shadowctl")
			ctx := context.Background()
			m := db.ready(shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", Sync: shadow.SyncLogical})
			fctx, stop := context.WithTimeout(ctx, 20*time.Second)
			defer stop()
			done := make(chan error, 1)
			go func() { done <- db.Runner.Follow(fctx, m.ID) }()
			db.exec(`UPDATE orders SET status = 'shipped' WHERE id <= 10`, c.sql)
			if err := <-done; err == nil || fctx.Err() != nil {
				t.Fatalf("follow: %v (context: %v), want it to stop on its own", err, fctx.Err())
			}
			got := db.migration(m.ID)
			if got.Phase != shadow.Failed || !strings.Contains(got.Error, c.want.Error()) {
				t.Fatalf("phase %s, error %q: want failed, naming %q", got.Phase, got.Error, c.want)
			}
			if _, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err == nil {
				t.Fatal("cutover of a failed migration went ahead")
			}
			if kind := scalar[string](db, `SELECT relkind::text FROM pg_class WHERE oid = 'public.orders'::regclass`); kind != "r" {
				t.Fatalf("public.orders is relkind %s, want the table (blue still serves)", kind)
			}
			if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
				t.Fatal(err)
			}
			assertNoToolObjects(t, db, "green")
			if c.name == "truncate" {
				assertSameSchema(t, "after abort", before, dbFingerprint(t, db, "shadowctl"))
			}
		})
	}
}

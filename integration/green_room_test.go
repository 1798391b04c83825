package integration

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/shadow"
)

// The copy leaves room on green's pages (fillfactor 90 when blue sets none),
// so that the sync's updates of green are HOT: the new row version on the
// same page and no new index entries. A packed page has no room, and every
// synced update then writes a version elsewhere and an entry in each of
// green's three indexes. Finalize gives the table blue's setting back.
func TestSyncUpdatesOfGreenAreHOT(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(20000)
	ctx := context.Background()
	id := db.readyMigration("orders", issue4Alter)
	if got := scalar[string](db, `SELECT coalesce(array_to_string(reloptions, ','), '') FROM pg_class WHERE oid = 'green.orders'::regclass`); got != "fillfactor=90" {
		t.Fatalf("green's storage parameters at ready: %q, want fillfactor=90", got)
	}
	// Updates of a column no index covers, spread over green's pages; the
	// transaction's own statistics count the trigger's writes to green.
	var upd, hot int64
	err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `UPDATE public.orders SET status = 'paid' WHERE id % 50 = 0`); err != nil {
			return err
		}
		return tx.QueryRow(ctx, `SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relid = 'green.orders'::regclass`).Scan(&upd, &hot)
	})
	if err != nil {
		t.Fatal(err)
	}
	if upd != 400 || hot < upd*9/10 {
		t.Fatalf("the sync updated green %d times, %d of them HOT; want 400, at least 90 %% HOT", upd, hot)
	}
	db.assertGreenMatches(`SELECT id, status FROM public.orders`, `SELECT id, status FROM green.orders`)
	if _, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Finalize(ctx, id, 0, true, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := scalar[string](db, `SELECT coalesce(array_to_string(reloptions, ','), '') FROM pg_class WHERE oid = 'public.orders'::regclass`); got != "" {
		t.Fatalf("storage parameters after finalize: %q, want none (blue's)", got)
	}
}

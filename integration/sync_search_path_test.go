package integration

import (
	"context"
	"slices"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/shadow"
)

// Trigger sync's functions run as their owner in every writer's session.
// A writer whose search_path puts a schema of its own ahead of pg_catalog
// must not get its operators or functions run by them: here every write
// the sync handles (insert, update, update of the key, delete) comes from
// such a session, whose "=" operators record each call, and none is made.
// The upsert that serves inserts and same-key updates resolves no name at
// all, so it runs without a fixed search_path (each call of a function
// that fixes one sets and restores it: about 2.5 % of the bench's
// throughput); the function behind deletes and key changes fixes one.
func TestTriggerSyncRunsNothingFromTheWritersSearchPath(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	db.createOrders(300)
	db.exec(
		`CREATE SCHEMA hostile`,
		`CREATE TABLE hostile.calls (what text)`,
		`CREATE FUNCTION hostile.text_eq(text, text) RETURNS boolean LANGUAGE sql AS
			$$ INSERT INTO hostile.calls VALUES ('text = text') RETURNING $1 OPERATOR(pg_catalog.=) $2 $$`,
		`CREATE OPERATOR hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.text_eq)`,
		`CREATE FUNCTION hostile.int84_eq(bigint, integer) RETURNS boolean LANGUAGE sql AS
			$$ INSERT INTO hostile.calls VALUES ('bigint = integer') RETURNING $1 OPERATOR(pg_catalog.=) $2 $$`,
		`CREATE OPERATOR hostile.= (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = hostile.int84_eq)`,
		`CREATE FUNCTION hostile.floor(numeric) RETURNS numeric LANGUAGE sql AS
			$$ INSERT INTO hostile.calls VALUES ('floor') RETURNING pg_catalog.floor($1) $$`,
	)
	m := db.ready(shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint", Sync: shadow.SyncTrigger})

	fixed := scalar[[]string](db, `SELECT array_agg(p.proname::text || ':' || (p.proconfig IS NOT NULL)::text ORDER BY p.proname)
		FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = 'public.orders'::regclass AND NOT t.tgisinternal AND t.tgname LIKE 'shadowctl\_fwd\_%'`)
	base := "fwd_" + m.State.Plan.Names.Base
	want := []string{base + ":true", base + ":true", base + "_upsert:false", base + "_upsert:false"}
	if !slices.Equal(fixed, want) {
		t.Fatalf("sync functions behind blue's triggers (name:fixes its search_path): %v, want %v", fixed, want)
	}

	conn, err := pgx.Connect(ctx, db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, s := range []string{
		`SET search_path = hostile, pg_catalog, public`,
		// The session's own "=" does run where the session itself compares:
		// the trap is live.
		`SELECT 'a' = 'a'`,
		`INSERT INTO public.orders (customer_id, customer_name, amount) VALUES (3, 'customer 3', 12.5)`,
		`UPDATE public.orders SET status = 'paid', amount = amount + 1 WHERE id BETWEEN 10 AND 20`,
		`UPDATE public.orders SET id = id + 100000 WHERE id BETWEEN 30 AND 35`,
		`DELETE FROM public.orders WHERE id BETWEEN 40 AND 45`,
	} {
		if _, err := conn.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	if n := scalar[int](db, `SELECT count(*) FROM hostile.calls`); n != 1 {
		t.Fatalf("the writer's own operators and functions ran %d times, want once (its own comparison): %v", n,
			scalar[[]string](db, `SELECT array_agg(what) FROM hostile.calls`))
	}
	db.assertGreenMatches(
		`SELECT id::bigint, customer_id, customer_name, amount::numeric(12,2), status, created_at FROM public.orders`,
		`SELECT id, customer_id, customer_name, amount, status, created_at FROM green.orders`)
}

package integration

import (
	"context"
	"testing"

	"github.com/shadowctl/shadowctl/shadow"
)

// Storage parameters, the table comment and the replica identity survive the
// whole lifecycle.
func TestTableOptionsSurviveFinalize(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	db.exec(`CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, payload text) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05)`,
		`ALTER TABLE events REPLICA IDENTITY FULL`,
		`COMMENT ON TABLE events IS 'audit events'`,
		`INSERT INTO events SELECT g, 'k' || (g % 7), md5(g::text) FROM generate_series(1, 5000) g`)
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "events", Alter: "ALTER COLUMN kind TYPE varchar(16)"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := scalar[string](db, `SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid = 'public.events'::regclass`); got != "fillfactor=70,autovacuum_vacuum_scale_factor=0.05" {
		t.Errorf("reloptions after finalize: %q", got)
	}
	if got := scalar[string](db, `SELECT relreplident::text FROM pg_class WHERE oid = 'public.events'::regclass`); got != "f" {
		t.Errorf("replica identity after finalize: %q, want f", got)
	}
	if got := scalar[string](db, `SELECT obj_description('public.events'::regclass, 'pg_class')`); got != "audit events" {
		t.Errorf("comment after finalize: %q", got)
	}
	if got := scalar[int](db, `SELECT count(*) FROM public.events`); got != 5000 {
		t.Errorf("%d rows after finalize", got)
	}
}

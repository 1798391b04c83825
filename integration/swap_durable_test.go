package integration

import (
	"context"
	"testing"

	"github.com/shadowctl/shadowctl/shadow"
)

// The swap commits without waiting for the WAL flush, so its locks go at
// once; the cutover and the rollback are durable before they return all the
// same: the record of the swap is committed synchronously, whatever the
// database's default, and its flush covers the swap's commit. Here the WAL
// writer flushes only every 10 s and the database commits asynchronously by
// default, so nothing else would have flushed the swap when they return.
func TestSwapIsDurableWhenReported(t *testing.T) {
	ctx := context.Background()
	srv := ownCluster(t, "whose WAL writer waits 10 s", map[string]string{"wal_writer_delay": "'10s'"})
	db := dbOn(t, srv)
	if _, err := db.Pool.Exec(ctx, `ALTER DATABASE postgres SET synchronous_commit = off`); err != nil {
		t.Fatal(err)
	}
	db.Pool.Reset() // new sessions take the database's default
	if got := scalar[string](db, `SHOW synchronous_commit`); got != "off" {
		t.Fatalf("synchronous_commit is %s, want the database's default off", got)
	}
	createItems(db, "items", 2000)
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint"})
	if err != nil {
		t.Fatal(err)
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil || m.Phase != shadow.Ready {
		t.Fatalf("drive: %v %v", m.Phase, err)
	}
	durable := func(what string, m *shadow.Migration) {
		t.Helper()
		lc := m.State.LastCutover
		if lc == nil || lc.Kind != what || lc.AfterCommitLSN == "" {
			t.Fatalf("%s: swap record %+v, want one with the WAL position after its commit", what, lc)
		}
		if !scalar[bool](db, `SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn`, lc.AfterCommitLSN) {
			t.Fatalf("%s returned with the WAL flushed only to %s, short of its commit (%s)", what,
				scalar[string](db, `SELECT pg_current_wal_flush_lsn()::text`), lc.AfterCommitLSN)
		}
	}
	if m, err = db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	durable("cutover", m)
	if m, err = db.Runner.Rollback(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	durable("rollback", m)
	if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
		t.Fatal(err)
	}
}

package integration

import (
	"context"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// The daemon keeps a logical sync applied while the migration waits at ready,
// and a cutover run from elsewhere (the CLI) drains through it.
func TestDaemonFollowsLogicalSyncAtReady(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(5000)
	ctx := context.Background()
	d := db.startDaemon(daemon.Config{})
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", Sync: shadow.SyncLogical})
	if err != nil {
		t.Fatal(err)
	}
	d.Wake()
	db.waitPhase(m.ID, shadow.Ready, 2*time.Minute)
	db.exec(`UPDATE orders SET status = 'seen-by-green' WHERE id <= 100`)
	waitTrue(t, time.Minute, "green to receive the change through the daemon's logical sync", func() bool {
		return scalar[int](db, `SELECT count(*) FROM green.orders WHERE status = 'seen-by-green'`) == 100
	})
	if _, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	waitTrue(t, time.Minute, "the daemon to stop reading the slot", func() bool {
		return scalar[int](db, `SELECT count(*) FROM pg_replication_slots WHERE database = current_database()`) == 0
	})
	if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := scalar[int](db, `SELECT count(*) FROM public.orders WHERE status = 'seen-by-green'`); n != 100 {
		t.Fatalf("%d changed rows after finalize, want 100", n)
	}
}

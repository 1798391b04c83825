package integration

import (
	"context"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// postpone holds an automatic cutover: the daemon brings the migration to
// ready and leaves it there, scan after scan, without an attempt; resume
// lets it cut over.
func TestPostponeHoldsAnAutomaticCutover(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		CutoverPolicy: shadow.CutoverAuto})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Runner.Store.Postpone(ctx, m.ID, "test"); err != nil {
		t.Fatal(err)
	}
	d := db.startDaemon(daemon.Config{})
	db.waitPhase(m.ID, shadow.Ready, 60*time.Second)
	d.waitScans(t, 5)
	if ph := db.migration(m.ID).Phase; ph != shadow.Ready {
		t.Fatalf("phase %s after five scans at ready with the cutover postponed, want ready", ph)
	}
	if n := len(db.events(m.ID, "cutover_attempt")); n != 0 {
		t.Fatalf("%d cutover attempts while postponed, want 0", n)
	}
	if st := shadow.StatusOf(db.migration(m.ID), time.Now()); !st.CutoverHeld {
		t.Fatal("status does not say the cutover is held")
	}
	if err := db.Runner.Store.Resume(ctx, m.ID, "test"); err != nil {
		t.Fatal(err)
	}
	d.Wake()
	db.waitPhase(m.ID, shadow.CutOver, 60*time.Second)
}

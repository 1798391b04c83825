package integration

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// After the cutover, the daemon's periodic verification only reports: green
// serves, so a difference is neither repaired (green keeps what it has, the
// application's writes included) nor rolled back without --auto-rollback.
// It becomes a verify_mismatch event and the driver's last_error.
func TestVerifyAfterCutoverReportsAndNeverRepairs(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		CutoverPolicy: shadow.CutoverAuto, VerifyEvery: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	db.startDaemon(daemon.Config{})
	db.waitPhase(m.ID, shadow.CutOver, 60*time.Second)
	// Behind the tool's back: change green without firing the reverse sync.
	err = pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL session_replication_role = replica`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE green.orders SET customer_name = 'corrupted' WHERE id = 42`)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	waitTrue(t, 60*time.Second, "a verify_mismatch event", func() bool { return len(db.events(m.ID, "verify_mismatch")) > 0 })
	waitTrue(t, 30*time.Second, "the driver's last_error", func() bool {
		st := shadow.StatusOf(db.migration(m.ID), time.Now())
		return st.Driver != nil && st.Driver.LastError != ""
	})
	cur := db.migration(m.ID)
	if cur.Phase != shadow.CutOver {
		t.Fatalf("phase %s after a mismatch without --auto-rollback, want cut_over", cur.Phase)
	}
	if got := scalar[string](db, `SELECT customer_name FROM green.orders WHERE id = 42`); got != "corrupted" {
		t.Fatalf("green's row 42 is %q after the verification: it was changed, want it left as found", got)
	}
	if n := len(db.events(m.ID, "auto_rollback")); n != 0 {
		t.Fatalf("%d auto-rollbacks without --auto-rollback", n)
	}
}

//go:build soak

package integration

import (
	"context"
	"os"
	"strconv"
	"testing"

	"github.com/shadowctl/shadowctl/shadow"
)

// TestSoakRepeatedSwaps runs a larger table through many cutover/rollback
// cycles under the workload, in both sync modes, and checks the exact end
// state. `make soak` runs it (build tag soak); SOAK_ROWS and SOAK_CYCLES size
// it.
func TestSoakRepeatedSwaps(t *testing.T) {
	rows, cycles := envInt("SOAK_ROWS", 300000), envInt("SOAK_CYCLES", 10)
	forEachSyncMode(t, func(t *testing.T, mode shadow.SyncMode) {
		db := newTestDB(t)
		db.createOrders(rows)
		ctx := context.Background()
		w := startWorkload(t, db.DSN, 4)
		w.waitRunning()
		m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint", Sync: mode})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < cycles; i++ {
			w.waitOps(500)
			if _, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
				t.Fatalf("cycle %d cutover: %v", i, err)
			}
			w.waitOps(500)
			if _, err := db.Runner.Rollback(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
				t.Fatalf("cycle %d rollback: %v", i, err)
			}
		}
		if _, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Runner.Finalize(ctx, m.ID, 0, true, shadow.CutoverOptions{}); err != nil {
			t.Fatal(err)
		}
		w.stopAndCheck(t)
	})
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

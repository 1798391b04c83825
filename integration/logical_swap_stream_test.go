package integration

import (
	"context"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/shadow"
)

// The logical swap takes blue out of its publication in the swap's own
// transaction; the publication itself is dropped only after the slot. A WAL
// sender still reading the stream right after the commit must decode past
// it: had the swap dropped the publication, the sender's next decoded change
// would fail ("publication … does not exist", an ERROR in the server's log
// at every cutover) and its follower reconnect and fail again, with the
// application just let go. Here, between the swap's commit and the slot's
// removal, a write through the view (green, and blue through the reverse
// sync) must be read by the WAL sender without an error.
func TestLogicalSwapLeavesTheStreamReadable(t *testing.T) {
	db, m := logicalOrdersAtReady(t, 2000)
	ctx := context.Background()
	slot := m.State.Slot
	checked := false
	_, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{AfterCommit: func(ctx context.Context) {
		checked = true
		// The cutover's follower stops once the catalog says the stream is
		// done; hold the catalog's table so that it reads on meanwhile.
		hold, err := db.Pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer hold.Rollback(ctx)
		if _, err := hold.Exec(ctx, `LOCK TABLE shadowctl.migrations IN ACCESS EXCLUSIVE MODE`); err != nil {
			t.Fatal(err)
		}
		db.exec(`UPDATE orders SET status = 'after the swap' WHERE id = 1`)
		written := scalar[string](db, `SELECT pg_current_wal_lsn()::text`)
		waitFor(t, "the WAL sender to decode past the first write after the swap", 20*time.Second, func() (bool, error) {
			var past bool
			err := db.Pool.QueryRow(ctx, `SELECT coalesce(bool_or(r.sent_lsn >= $2::pg_lsn), false)
				FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
				WHERE s.slot_name = $1`, slot, written).Scan(&past)
			return past, err
		})
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !checked {
		t.Fatal("the failpoint after the swap's commit never ran")
	}
	if got := scalar[string](db, `SELECT status FROM green.orders WHERE id = 1`); got != "after the swap" {
		t.Fatalf("green's row 1 has status %q", got)
	}
	if got := scalar[string](db, `SELECT status FROM `+m.State.Plan.Reverse.Target.Quoted()+` WHERE id = 1`); got != "after the swap" {
		t.Fatalf("blue's row 1 has status %q: the reverse sync missed it", got)
	}
}

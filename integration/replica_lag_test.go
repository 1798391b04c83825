package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// --max-replica-lag holds the copy while a streaming standby falls behind
// (here: its replay is paused, as a long query on it can hold it), status
// says so, and the copy goes on once the standby has caught up.
func TestCopyWaitsForALaggingReplica(t *testing.T) {
	ctx := context.Background()
	primary := ownCluster(t, "with a streaming standby", nil)
	standby := ownStandby(t, primary)
	db := dbOn(t, primary)
	sb, err := pgxpool.New(ctx, standby.AdminDSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sb.Close)
	onStandby := func(sql string) {
		t.Helper()
		if _, err := sb.Exec(ctx, sql); err != nil {
			t.Fatalf("on the standby: %s: %v", sql, err)
		}
	}

	const rows = 6000
	db.createOrders(rows)
	waitTrue(t, 30*time.Second, "the standby to stream", func() bool {
		return scalar[bool](db, `SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming'`)
	})
	onStandby(`SELECT pg_wal_replay_pause()`)
	waitTrue(t, 30*time.Second, "the standby's replay to pause", func() bool {
		var state string
		return sb.QueryRow(ctx, `SELECT pg_get_wal_replay_pause_state()`).Scan(&state) == nil && state == "paused"
	})

	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 1000, MaxReplicaLag: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	db.startDaemon(daemon.Config{})
	reason := db.throttledReason(m.ID)
	if !strings.Contains(reason, "replica lag") {
		t.Fatalf("throttled: %q, want the replica's lag named", reason)
	}
	held := db.rowsCopied(m.ID)
	db.assertCopyHeld(m.ID, held)
	t.Logf("held at %d rows: %s", held, reason)

	onStandby(`SELECT pg_wal_replay_resume()`)
	m2 := db.waitPhase(m.ID, shadow.Ready, 120*time.Second)
	if m2.Throttled != "" {
		t.Fatalf("still throttled at ready: %q", m2.Throttled)
	}
	if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
		t.Fatal(err)
	}
}

// ownStandby starts a hot standby of primary (a cluster of the test's own)
// that reports its progress every second.
func ownStandby(t *testing.T, primary *pgtest.Server) *pgtest.Server {
	t.Helper()
	srv, err := pgtest.StartStandby(context.Background(), primary, map[string]string{"wal_receiver_status_interval": "1s"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv
}

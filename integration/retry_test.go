package integration

import (
	"context"
	"errors"
	"testing"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/shadow"
)

// A migration that failed mid-copy is retried from its checkpoints (not from
// zero) and ends exact; a retry of a phase that cannot be retried is refused.
func TestRetryFailedMigrationFromCheckpoint(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(20000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", BatchSize: 1000, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("injected: the disk is on fire")
	batches := 0
	db.Runner.Failpoints.CopyBatch = func(ctx context.Context, _ backfill.Range) error {
		if batches++; batches == 5 {
			return boom
		}
		return nil
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); !errors.Is(err, boom) {
		t.Fatalf("drive: %v, want the injected failure", err)
	}
	m, _ = db.Runner.Store.Get(ctx, db.Pool, m.ID)
	if m.Phase != shadow.Failed || m.RowsCopied == 0 {
		t.Fatalf("after the failure: phase %s, rows copied %d; want failed with progress kept", m.Phase, m.RowsCopied)
	}
	kept := m.RowsCopied
	db.Runner.Failpoints.CopyBatch = nil
	if m, err = db.Runner.Retry(ctx, m.ID); err != nil || m.Phase != shadow.Copying {
		t.Fatalf("retry: phase %v, %v; want copying", m.Phase, err)
	}
	if m.RowsCopied != kept {
		t.Fatalf("retry lost the checkpoints: %d rows, had %d", m.RowsCopied, kept)
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil || m.Phase != shadow.Ready {
		t.Fatalf("drive after retry: %v %v", m.Phase, err)
	}
	db.assertGreenMatches(`SELECT id, amount::numeric(12,2) FROM public.orders`, `SELECT id, amount FROM green.orders`)
	if _, err := db.Runner.Retry(ctx, m.ID); err != nil {
		t.Fatalf("retry of a ready migration is a no-op, got %v", err)
	}
}

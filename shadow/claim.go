package shadow

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/lock"
)

// ErrClaimed means another process drives the migration.
var ErrClaimed = errors.New("another process drives this migration")

// ErrClaimLost means this process's claim on a migration ended (its lock
// connection died): it must stop driving it.
var ErrClaimLost = errors.New("lost the claim on the migration")

// claimName is the advisory-lock name of a migration's driver claim.
func claimName(id string) string { return "migration:" + id }

type claimHandle struct {
	l    *lock.Lock
	lost <-chan struct{}
}

func (c *claimHandle) release() { _ = c.l.Release(context.Background()) }

// claim takes the migration's driver lock on a dedicated connection, waiting
// up to wait for a previous driver to let go.
func (r *Runner) claim(ctx context.Context, id string, wait time.Duration) (*claimHandle, error) {
	cfg := r.ConnConfig.Copy()
	cfg.RuntimeParams["application_name"] = "shadowctl driver " + id
	l, err := lock.Acquire(ctx, cfg, claimName(id), wait)
	if errors.Is(err, lock.ErrHeld) {
		return nil, fmt.Errorf("migration %s: %w: %v", id, ErrClaimed, err)
	}
	if err != nil {
		return nil, fmt.Errorf("migration %s: claim: %w", id, err)
	}
	return &claimHandle{l: l, lost: l.Lost()}, nil
}

var _ = pgx.ErrNoRows

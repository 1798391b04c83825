package shadow

import (
	"context"
	"errors"
	"fmt"
	"time"

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

func (c *claimHandle) release() {
	if c.l != nil {
		_ = c.l.Release(context.Background())
	}
}

// Claim is a held driver claim on a migration (see Runner.TryClaim).
type Claim struct {
	id string
	h  *claimHandle
}

// Lost is closed when the claim's connection dies.
func (c *Claim) Lost() <-chan struct{} { return c.h.lost }

// BackendPID is the server process that holds the claim.
func (c *Claim) BackendPID() int32 { return c.h.l.BackendPID() }

// Release lets the migration go.
func (c *Claim) Release() { c.h.release() }

// TryClaim takes the migration's driver claim without waiting: it fails at
// once with ErrClaimed when another process drives it. The claim ends when
// ctx ends or Release is called.
func (r *Runner) TryClaim(ctx context.Context, id string) (*Claim, error) {
	h, err := r.claim(ctx, id, 0)
	if err != nil {
		return nil, err
	}
	return &Claim{id: id, h: h}, nil
}

type heldClaimKey struct{ id string }

// WithClaim returns a context under which the runner's methods (Drive,
// Cutover, Rollback, Finalize) use the held claim instead of taking their own.
func WithClaim(ctx context.Context, c *Claim) context.Context {
	return context.WithValue(ctx, heldClaimKey{c.id}, c.h)
}

// claim takes the migration's driver lock on a dedicated connection, waiting
// up to wait for a previous driver to let go. Under a context from WithClaim
// it reuses the caller's claim.
func (r *Runner) claim(ctx context.Context, id string, wait time.Duration) (*claimHandle, error) {
	if h, ok := ctx.Value(heldClaimKey{id}).(*claimHandle); ok {
		return &claimHandle{lost: h.lost}, nil
	}
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

// Package retry holds the waiting shared by every retry loop of shadowctl:
// context-aware sleeps and exponential backoff with full jitter. It owns no
// policy (what to retry, how often) — callers decide that.
package retry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Sleep waits d, or returns ctx's error as soon as ctx ends.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Backoff waits before retry number attempt (0-based): exponential from base,
// capped at ceiling, with jitter (half fixed, half random) so that retrying
// clients spread out.
func Backoff(ctx context.Context, attempt int, base, ceiling time.Duration) error {
	return Sleep(ctx, Delay(attempt, base, ceiling))
}

// Delay is the jittered wait before retry number attempt.
func Delay(attempt int, base, ceiling time.Duration) time.Duration {
	d := base << min(attempt, 16)
	if d > ceiling || d <= 0 {
		d = ceiling
	}
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

package backfill

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff waits before retry number attempt (0-based): exponential from base,
// capped at ceiling, with full jitter so that retrying clients spread out.
func Backoff(ctx context.Context, attempt int, base, ceiling time.Duration) error {
	d := base << min(attempt, 16)
	if d > ceiling || d <= 0 {
		d = ceiling
	}
	d = d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
	return sleepUntil(ctx, time.Now().Add(d))
}

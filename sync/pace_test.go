package sync

import (
	"context"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/pace"
)

func pacedApplier(busy bool) *Applier {
	a := &Applier{awaited: make(chan struct{}, 1)}
	a.Pace = func(context.Context) pace.Pace { return pace.Pace{Workers: 1, Duty: 0.01, Busy: busy} }
	return a
}

func TestApplierRestsWhileTheApplicationIsBusy(t *testing.T) {
	a := pacedApplier(true)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	// A piece of 10 ms at a 1 % duty: a rest of about a second, which the
	// context ends first.
	if err := a.rest(ctx, 10*time.Millisecond); err == nil {
		t.Fatal("the writer did not rest while the application was busy")
	}
}

func TestApplierDoesNotRestWhenQuiet(t *testing.T) {
	a := pacedApplier(false)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	if err := a.rest(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("rested %s with the application quiet", took)
	}
}

func TestMarkerEndsARest(t *testing.T) {
	a := pacedApplier(true)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.rest(ctx, time.Second) }() // a rest of about 99 s
	a.awaited <- struct{}{}
	if err := <-done; err != nil {
		t.Fatalf("rest ended with %v, want the marker to end it", err)
	}
	// And while markers come there is no rest at all.
	a.awaitedTill.Store(time.Now().Add(time.Minute).UnixNano())
	if err := a.rest(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
}

// Package daemon is the supervisor behind `shadowctl daemon`: it LISTENs on
// the catalog's channel and polls, claims each migration that needs driving
// without waiting (a session advisory lock per migration, so several daemons
// share a catalog and each migration has one driver), and drives it with the
// shadow runner in its own goroutine: phases up to ready, the cutover when the
// migration's policy says (auto, at a time, inside a window), verification
// after the cutover with optional automatic rollback, and lifecycle hooks. It
// also serves /metrics, /healthz and the status API over HTTP.
//
// It does not know how a phase works (package shadow) nor how the operator
// asked for it (cmd/shadowctl): the catalog is the only interface.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/internal/retry"
	"github.com/shadowctl/shadowctl/internal/window"
	"github.com/shadowctl/shadowctl/lock"
	"github.com/shadowctl/shadowctl/shadow"
	"golang.org/x/sync/errgroup"
)

// ErrNoToken means a state-changing HTTP endpoint was called while no token
// is configured (they are off).
var ErrNoToken = errors.New("state-changing endpoints are off: start the daemon with --token-file")

// Config configures a daemon.
type Config struct {
	Runner *shadow.Runner
	// ListenConfig is the connection used for LISTEN (default: the runner's).
	ListenConfig *pgx.ConnConfig
	Log          zerolog.Logger
	// Poll is how often the catalog is read without a notification (2s).
	Poll time.Duration
	// Clock decides cutover windows and schedules (the system clock).
	Clock window.Clock
	// Identity names this daemon in events and status (host/pid).
	Identity string
	// HTTPAddr, when set, serves /metrics, /healthz and /v1/migrations.
	HTTPAddr string
	// Token guards the state-changing endpoints; empty turns them off.
	Token string
	// HookTimeout bounds each hook command (5m).
	HookTimeout time.Duration
	// RetryAfter is how long a vetoed or failed cutover (outside a window
	// policy) waits before the next attempt (1m).
	RetryAfter time.Duration
	// OnBatch, when set, is told about each committed copy batch.
	OnBatch func(id string, rows int64)
}

// Daemon drives the migrations of one catalog.
type Daemon struct {
	cfg     Config
	r       *shadow.Runner
	log     zerolog.Logger
	metrics *metrics

	wake  chan struct{}
	scans atomic.Int64

	mu          sync.Mutex
	active      map[string]bool
	following   map[string]bool      // logical syncs applied by this daemon
	retryAfter  map[string]time.Time // vetoed or failed cutovers
	backoff     map[string]time.Time // after failed work, for any work
	windowTried map[string]time.Time // window start whose cutover failed
	lastVerify  map[string]time.Time
	failures    map[string]int    // consecutive failed work units, for backoff
	lastErr     map[string]string // the last failed work unit's error
	lastScanOK  time.Time
	hookMu      sync.Mutex // one hook runner at a time per daemon

	addr  atomic.Pointer[string]
	ready chan struct{}
}

// New checks the configuration and returns a daemon.
func New(cfg Config) (*Daemon, error) {
	if cfg.Runner == nil {
		return nil, errors.New("daemon: no runner")
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 2 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = window.SystemClock{}
	}
	if cfg.Identity == "" {
		host, _ := os.Hostname()
		cfg.Identity = fmt.Sprintf("%s/%d", host, os.Getpid())
	}
	if cfg.ListenConfig == nil {
		cfg.ListenConfig = cfg.Runner.ConnConfig
	}
	if cfg.HookTimeout <= 0 {
		cfg.HookTimeout = 5 * time.Minute
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = time.Minute
	}
	d := &Daemon{
		cfg: cfg, r: cfg.Runner, log: cfg.Log.With().Str("daemon", cfg.Identity).Logger(),
		metrics: newMetrics(), wake: make(chan struct{}, 1), active: map[string]bool{}, following: map[string]bool{},
		retryAfter: map[string]time.Time{}, windowTried: map[string]time.Time{}, lastVerify: map[string]time.Time{},
		backoff: map[string]time.Time{}, failures: map[string]int{}, lastErr: map[string]string{}, ready: make(chan struct{}),
	}
	d.r.Progress = func(id string, n int64) {
		d.metrics.batchRows.WithLabelValues(id).Add(float64(n))
		if cfg.OnBatch != nil {
			cfg.OnBatch(id, n)
		}
	}
	return d, nil
}

// Identity is the name this daemon records as driver.
func (d *Daemon) Identity() string { return d.cfg.Identity }

// Scans counts completed catalog scans (tests wait on it instead of sleeping).
func (d *Daemon) Scans() int64 { return d.scans.Load() }

// Ready is closed once the HTTP listener (if any) is up and the first scan ran.
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// Addr is the HTTP listener's address ("" without --http or before Ready).
func (d *Daemon) Addr() string {
	if p := d.addr.Load(); p != nil {
		return *p
	}
	return ""
}

// Wake makes the daemon scan the catalog now.
func (d *Daemon) Wake() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Run drives migrations until ctx ends, then stops every driven migration
// at its next checkpoint (the copy commits each batch with its checkpoint),
// releases the claims and returns nil.
func (d *Daemon) Run(ctx context.Context) error {
	if _, _, err := d.r.Store.Cat.Init(ctx, d.r.Pool); err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	var srv *http.Server
	if d.cfg.HTTPAddr != "" {
		ln, err := net.Listen("tcp", d.cfg.HTTPAddr)
		if err != nil {
			return fmt.Errorf("daemon: --http %s: %w", d.cfg.HTTPAddr, err)
		}
		a := ln.Addr().String()
		d.addr.Store(&a)
		srv = &http.Server{Handler: d.handler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				d.log.Error().Err(err).Msg("http server stopped")
			}
		}()
		d.log.Info().Str("addr", a).Msg("serving /metrics, /healthz, /v1/migrations")
	}
	var work errgroup.Group
	go d.listen(ctx)
	d.log.Info().Dur("poll", d.cfg.Poll).Msg("daemon started")
	tick := time.NewTicker(d.cfg.Poll)
	defer tick.Stop()
	failures := 0
	for first := true; ; first = false {
		if err := d.scan(ctx, &work); err != nil && ctx.Err() == nil {
			failures++
			d.log.Error().Err(err).Int("attempt", failures).Msg("catalog scan failed; retrying with backoff")
			_ = retry.Backoff(ctx, failures, d.cfg.Poll/4, 30*time.Second)
		} else {
			failures = 0
		}
		if first {
			close(d.ready)
		}
		select {
		case <-ctx.Done():
			d.log.Info().Msg("stopping: every driven migration stops at its next checkpoint")
			_ = work.Wait()
			if srv != nil {
				sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_ = srv.Shutdown(sctx)
				cancel()
			}
			d.log.Info().Msg("daemon stopped")
			return nil
		case <-d.wake:
		case <-tick.C:
		}
	}
}

// listen wakes the loop on every NOTIFY of the catalog channel, on its own
// connection, reconnecting with backoff (and scanning after a reconnect, for
// what was missed meanwhile).
func (d *Daemon) listen(ctx context.Context) {
	for attempt := 0; ctx.Err() == nil; attempt++ {
		err := d.listenOnce(ctx, func() { attempt = 0 })
		if ctx.Err() != nil {
			return
		}
		d.log.Warn().Err(err).Int("attempt", attempt+1).Msg("LISTEN connection lost; reconnecting")
		if retry.Backoff(ctx, attempt, 100*time.Millisecond, 30*time.Second) != nil {
			return
		}
	}
}

func (d *Daemon) listenOnce(ctx context.Context, connected func()) error {
	cfg := d.cfg.ListenConfig.Copy()
	cfg.RuntimeParams["application_name"] = "shadowctl daemon listen"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("listen: connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{shadow.NotifyChannel}.Sanitize()); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	connected()
	d.Wake()
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		d.log.Debug().Str("migration", n.Payload).Msg("notified")
		d.Wake()
	}
}

// scan reads the catalog, updates the metrics and starts a driver for each
// migration that needs one and is not driven by anyone.
func (d *Daemon) scan(ctx context.Context, work *errgroup.Group) error {
	defer d.scans.Add(1)
	ms, err := d.r.Store.List(ctx)
	if err != nil {
		return err
	}
	now := d.cfg.Clock.Now()
	d.metrics.observe(ms, now, func(m *shadow.Migration, now time.Time) shadow.Status { return d.r.Store.Status(ctx, m, now) })
	d.mu.Lock()
	d.lastScanOK = time.Now()
	d.mu.Unlock()
	for _, m := range ms {
		if ctx.Err() != nil {
			return nil
		}
		d.follow(ctx, work, m)
		if d.isActive(m.ID) || !(d.needsWork(m, now) || d.hooksPending(ctx, m)) {
			continue
		}
		// Cheap look first: someone holds the claim.
		if hs, err := lock.Holders(ctx, d.r.Pool, lock.KeyFor("migration:"+m.ID)); err == nil && len(hs) > 0 {
			continue
		}
		claim, err := d.r.TryClaim(ctx, m.ID)
		if errors.Is(err, shadow.ErrClaimed) {
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			d.log.Warn().Err(err).Str("migration", m.ID).Msg("could not claim")
			continue
		}
		d.setActive(m.ID, true)
		id := m.ID
		work.Go(func() error {
			defer d.setActive(id, false)
			defer claim.Release()
			d.drive(ctx, claim, id)
			return nil
		})
	}
	return nil
}

// follow keeps a logical sync applied while its migration waits at ready
// (or is being cut over by another process): green stays current only while
// someone reads the slot. It needs no claim — the slot admits one reader, and
// a cutover run elsewhere drains through it.
func (d *Daemon) follow(ctx context.Context, work *errgroup.Group, m *shadow.Migration) {
	if !m.LogicalActive() || (m.Phase != shadow.Ready && m.Phase != shadow.CuttingOver) {
		return
	}
	d.mu.Lock()
	if d.following[m.ID] {
		d.mu.Unlock()
		return
	}
	d.following[m.ID] = true
	d.mu.Unlock()
	id := m.ID
	work.Go(func() error {
		defer func() {
			d.mu.Lock()
			delete(d.following, id)
			d.mu.Unlock()
		}()
		if err := d.r.Follow(ctx, id); err != nil && ctx.Err() == nil {
			d.log.Warn().Err(err).Str("migration", id).Msg("logical sync stopped")
		}
		return nil
	})
}

func (d *Daemon) isActive(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.active[id]
}

func (d *Daemon) setActive(id string, on bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if on {
		d.active[id] = true
	} else {
		delete(d.active, id)
	}
	d.metrics.driving.Set(float64(len(d.active)))
}

// needsWork says whether the daemon has something to do for m now.
func (d *Daemon) needsWork(m *shadow.Migration, now time.Time) bool {
	if m.Paused || m.Phase.Terminal() {
		return false
	}
	d.mu.Lock()
	backoff := time.Now().Before(d.backoff[m.ID])
	d.mu.Unlock()
	if backoff {
		return false
	}
	switch m.Phase {
	case shadow.Pending, shadow.Preparing, shadow.Copying, shadow.Verifying:
		return true
	case shadow.Ready, shadow.RolledBack:
		due, _, _ := shadow.CutoverDue(m, now)
		if !due {
			return false
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		if time.Now().Before(d.retryAfter[m.ID]) {
			return false
		}
		if s, ok := d.windowTried[m.ID]; ok && s.Equal(windowStart(m, now)) {
			return false // this window's attempt failed: wait for the next one
		}
		return true
	case shadow.CutOver:
		if !m.Request.AutoRollback && m.Request.VerifyEvery <= 0 {
			return false
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		return time.Since(d.lastVerify[m.ID]) >= verifyEvery(m)
	}
	return false
}

func verifyEvery(m *shadow.Migration) time.Duration {
	if m.Request.VerifyEvery > 0 {
		return m.Request.VerifyEvery
	}
	return shadow.DefaultVerifyEvery
}

func windowStart(m *shadow.Migration, now time.Time) time.Time {
	if m.Request.CutoverPolicy != shadow.CutoverWindow {
		return time.Time{}
	}
	w, err := window.Parse(m.Request.Window)
	if err != nil {
		return time.Time{}
	}
	s, _, _ := w.Next(now)
	return s
}

// drive does the work a claimed migration needs now, then lets it go.
func (d *Daemon) drive(ctx context.Context, claim *shadow.Claim, id string) {
	ctx, cancel := context.WithCancel(shadow.WithClaim(ctx, claim))
	defer cancel()
	var lost atomic.Bool
	go func() {
		select {
		case <-claim.Lost():
			d.log.Error().Str("migration", id).Msg("claim lost (its connection died); stopping")
			lost.Store(true)
			cancel()
		case <-ctx.Done():
		}
	}()
	log := d.log.With().Str("migration", id).Logger()
	since := time.Now().UTC()
	d.mu.Lock()
	info := shadow.DriverInfo{Daemon: d.cfg.Identity, Since: since, LastError: d.lastErr[id]}
	d.mu.Unlock()
	if err := d.r.Store.SetDriver(ctx, id, info); err != nil {
		log.Warn().Err(err).Msg("could not record the driver")
	}
	_ = d.r.Store.EventBy(ctx, d.r.Pool, id, d.cfg.Identity, "claimed", "driven by daemon "+d.cfg.Identity, map[string]any{"daemon": d.cfg.Identity, "backend_pid": claim.BackendPID()})
	log.Info().Msg("driving")
	err := d.step(ctx, id, log)
	after := context.WithoutCancel(ctx)
	d.fireHooks(ctx, id) // changes made meanwhile, also by CLI commands (skipped when stopping)
	if lost.Load() {
		cause := "its database connection died"
		if err != nil {
			cause += "; " + err.Error()
		}
		err = fmt.Errorf("migration %s: %w (%s)", id, shadow.ErrClaimLost, cause)
	} else if ctx.Err() != nil {
		err = nil // stopping (SIGTERM): not an error
	}
	d.mu.Lock()
	if err != nil {
		d.failures[id]++
		wait := min(d.cfg.Poll<<min(d.failures[id]-1, 10), 30*time.Second)
		d.backoff[id] = time.Now().Add(wait)
		info.LastError = err.Error()
		d.lastErr[id] = info.LastError
		log.Warn().Err(err).Dur("retry_in", wait).Msg("stopped driving")
	} else if ctx.Err() == nil {
		delete(d.failures, id)
		delete(d.lastErr, id)
		info.LastError = ""
	}
	d.mu.Unlock()
	released := time.Now().UTC()
	info.ReleasedAt = &released
	if serr := d.r.Store.SetDriver(after, id, info); serr != nil {
		log.Warn().Err(serr).Msg("could not record the driver")
	}
	d.Wake()
}

// step runs one unit of work: phases up to ready (and a due cutover), or a
// cutover, or a verification after the cutover.
func (d *Daemon) step(ctx context.Context, id string, log zerolog.Logger) error {
	m, err := d.r.Store.Get(ctx, d.r.Pool, id)
	if err != nil {
		return err
	}
	switch m.Phase {
	case shadow.Pending, shadow.Preparing, shadow.Copying, shadow.Verifying:
		var err error
		d.followHooks(ctx, id, func() { _, err = d.r.Drive(ctx, id, shadow.Ready) })
		if err != nil {
			if errors.Is(err, shadow.ErrStopped) || ctx.Err() != nil {
				return nil
			}
			return err
		}
		if m, err = d.r.Store.Get(ctx, d.r.Pool, id); err != nil {
			return err
		}
		if m.Phase != shadow.Ready || !d.needsWork(m, d.cfg.Clock.Now()) {
			return nil
		}
		return d.cutover(ctx, m, log)
	case shadow.Ready, shadow.RolledBack:
		if !d.needsWork(m, d.cfg.Clock.Now()) {
			return nil
		}
		return d.cutover(ctx, m, log)
	case shadow.CutOver:
		if !d.needsWork(m, d.cfg.Clock.Now()) {
			return nil // claimed for hooks only
		}
		return d.verifyAfterCutover(ctx, m, log)
	}
	return nil
}

// cutover attempts the swap the policy asked for: the before-cutover hook
// may veto it; inside a window the attempt ends with the window.
func (d *Daemon) cutover(ctx context.Context, m *shadow.Migration, log zerolog.Logger) error {
	now := d.cfg.Clock.Now()
	due, until, why := shadow.CutoverDue(m, now)
	if !due {
		return nil
	}
	if code, out, err := d.runHook(ctx, m, "before-cutover"); err != nil || code != 0 {
		msg := fmt.Sprintf("before-cutover hook vetoed the cutover (exit %d)", code)
		if err != nil {
			msg = fmt.Sprintf("before-cutover hook vetoed the cutover: %v", err)
		}
		if out != "" {
			msg += ": " + out
		}
		d.metrics.cutoverAttempts.WithLabelValues(m.ID, "vetoed").Inc()
		_ = d.r.Store.EventBy(ctx, d.r.Pool, m.ID, d.cfg.Identity, "cutover_vetoed", msg, map[string]any{"exit_code": code})
		d.noRetryUntil(m, now, time.Now().Add(d.cfg.RetryAfter))
		log.Warn().Msg(msg)
		return nil
	}
	deadline := 5 * time.Minute
	if !until.IsZero() {
		deadline = until.Sub(now)
	}
	_ = d.r.Store.EventBy(ctx, d.r.Pool, m.ID, d.cfg.Identity, "cutover_attempt",
		fmt.Sprintf("automatic cutover (%s), deadline %s", why, deadline.Round(time.Millisecond)), map[string]any{"policy": m.Request.CutoverPolicy})
	var res *shadow.Migration
	var err error
	d.followHooks(ctx, m.ID, func() {
		res, err = d.r.Cutover(ctx, m.ID, shadow.CutoverOptions{
			LockTimeout: m.Request.LockTimeout, Deadline: deadline,
			OnAttempt: func(cutover.Attempt) { d.metrics.lockAttempts.WithLabelValues(m.ID).Inc() },
		})
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		d.metrics.cutoverAttempts.WithLabelValues(m.ID, "failed").Inc()
		wait := "retrying in " + d.cfg.RetryAfter.String()
		if m.Request.CutoverPolicy == shadow.CutoverWindow {
			wait = "waiting for the next window"
		}
		_ = d.r.Store.EventBy(context.WithoutCancel(ctx), d.r.Pool, m.ID, d.cfg.Identity, "cutover_failed", fmt.Sprintf("automatic cutover did not happen: %v; %s", err, wait), nil)
		d.noRetryUntil(m, now, time.Now().Add(d.cfg.RetryAfter))
		return err
	}
	d.metrics.cutoverAttempts.WithLabelValues(m.ID, "ok").Inc()
	d.observeSwap(res)
	log.Info().Msg("cut over")
	return nil
}

func (d *Daemon) noRetryUntil(m *shadow.Migration, now, t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if m.Request.CutoverPolicy == shadow.CutoverWindow {
		d.windowTried[m.ID] = windowStart(m, now)
	} else {
		d.retryAfter[m.ID] = t
	}
}

func (d *Daemon) observeSwap(m *shadow.Migration) {
	if m == nil || m.State.LastCutover == nil {
		return
	}
	lc := m.State.LastCutover
	d.metrics.lockWait.WithLabelValues(lc.Kind).Observe(lc.LockWaitMS / 1000)
	d.metrics.lockHold.WithLabelValues(lc.Kind).Observe(lc.LockHoldMS / 1000)
}

// verifyAfterCutover compares green with the reverse-synced blue; with
// auto-rollback a difference rolls back to blue and postpones further
// automatic cutovers.
func (d *Daemon) verifyAfterCutover(ctx context.Context, m *shadow.Migration, log zerolog.Logger) error {
	d.mu.Lock()
	d.lastVerify[m.ID] = time.Now()
	d.mu.Unlock()
	res, err := d.r.VerifyServing(ctx, m.ID)
	switch {
	case err == nil:
		d.metrics.verifications.WithLabelValues(m.ID, "ok").Inc()
		return nil
	case !errors.Is(err, cutover.ErrMismatch):
		d.metrics.verifications.WithLabelValues(m.ID, "error").Inc()
		return fmt.Errorf("verification after the cutover: %w", err)
	}
	d.metrics.verifications.WithLabelValues(m.ID, "mismatch").Inc()
	msg := fmt.Sprintf("verification after the cutover found a difference: %s", res.FirstMismatch)
	_ = d.r.Store.EventBy(ctx, d.r.Pool, m.ID, d.cfg.Identity, "verify_mismatch", msg, res)
	log.Error().Str("first_mismatch", res.FirstMismatch).Msg("green differs from blue after the cutover")
	if !m.Request.AutoRollback {
		return errors.New(msg)
	}
	// Hold automatic cutovers first, so the rolled-back migration does not
	// cut over again by itself.
	if err := d.r.Store.Postpone(ctx, m.ID, d.cfg.Identity); err != nil {
		return err
	}
	var rb *shadow.Migration
	d.followHooks(ctx, m.ID, func() {
		rb, err = d.r.Rollback(ctx, m.ID, shadow.CutoverOptions{LockTimeout: m.Request.LockTimeout})
	})
	if err != nil {
		return fmt.Errorf("auto-rollback: %w", err)
	}
	d.observeSwap(rb)
	why := "auto-rollback: " + msg
	_ = d.r.Store.SetError(ctx, m.ID, why)
	_ = d.r.Store.EventBy(ctx, d.r.Pool, m.ID, d.cfg.Identity, "auto_rollback", why, res)
	log.Warn().Msg("rolled back to blue on its own")
	return nil
}

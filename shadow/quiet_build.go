package shadow

import (
	"context"
	"fmt"
	gosync "sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"golang.org/x/sync/errgroup"
)

// indexBuild says how one of green's deferred indexes is built.
type indexBuild int

const (
	// buildConcurrently: trigger sync, the application's writes reach
	// green through the trigger meanwhile.
	buildConcurrently indexBuild = iota
	// buildPlain: logical sync, where only the apply writes green, and it
	// waits for the builds.
	buildPlain
	// buildPlainYielding: trigger sync while the application is quiet.
	// Green's SHARE lock is taken first, under the migration's
	// lock_timeout, and a watcher cancels the build as soon as any session
	// waits for green (buildWhileQuiet).
	buildPlainYielding
)

// quietBuildTag opens the statement of every plain build that yields, so
// that the watcher cancels a backend only while it runs one (a connection
// that finished its builds goes back to the pool, and may be running the
// verification's comparison by the time a cancel for it is sent).
const quietBuildTag = "/* shadowctl: a plain build of green's index that yields to waiting sessions */ "

// quietBuildPoll is how often buildWhileQuiet looks for a session waiting
// for green. A writer that arrives during a plain build waits about this
// long, plus the cancel.
const quietBuildPoll = 10 * time.Millisecond

// buildWhileQuiet builds ixs plainly, two at a time, in trigger sync while
// the application is quiet, and returns the indexes it left to be built
// CONCURRENTLY.
//
// Why: a plain build reads green once, where a concurrent one reads it
// twice, validates the index against the table and waits out older
// transactions in between; and plain builds of one table run side by side,
// concurrent ones one at a time. At 2,000,000 rows, idle, trigger sync's
// time to ready: 4.92 s against 5.25 s (medians of four alternated runs).
//
// The cost it must not have: a plain build holds green's SHARE lock, and the
// trigger's writes to green, inside the application's transactions, wait
// for it. So a watcher polls every quietBuildPoll for any other session
// waiting for a lock on green (the trigger, a verification's repair, DDL),
// and at the first one it cancels the builds (pg_cancel_backend) and every
// index not built yet goes to the concurrent builds. A writer waits about
// one poll and the cancel; a build that finds green locked gives up after
// the migration's lock_timeout.
func (r *Runner) buildWhileQuiet(ctx context.Context, m *Migration, ixs []pgmeta.Index) ([]pgmeta.Index, error) {
	green := m.State.Plan.Forward.Target
	// The watcher's connection is taken first: it must never wait for
	// the pool while a build holds green.
	watchConn, err := r.Pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	defer watchConn.Release()
	var greenOID uint32
	if err := watchConn.QueryRow(ctx, `SELECT $1::regclass::oid`, green.Quoted()).Scan(&greenOID); err != nil {
		return nil, fmt.Errorf("migration %s: find green %s: %w", m.ID, green, err)
	}

	s := &quietBuilds{pids: map[uint32]bool{}}
	next := make(chan pgmeta.Index, len(ixs))
	for _, ix := range ixs {
		next <- ix
	}
	close(next)
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		s.watch(wctx, watchConn, r.Pool, greenOID, r.Log.With().Str("migration", m.ID).Logger())
	}()

	g, gctx := errgroup.WithContext(ctx)
	for range min(2, len(ixs)) {
		g.Go(func() error {
			return r.withMaintenanceConn(gctx, m, func(conn *pgxpool.Conn, gentle func() error) error {
				pid := conn.Conn().PgConn().PID()
				for ix := range next {
					if s.yielded.Load() {
						s.leave(ix)
						continue
					}
					s.running(pid, true)
					err := r.buildGreenIndex(gctx, m, conn, gentle, ix, buildPlainYielding)
					s.running(pid, false)
					if err != nil {
						// Green was locked when the build asked (the
						// application is writing after all), or the
						// watcher cancelled it: built concurrently instead.
						if code := pgsql.Code(err); code == pgsql.CodeLockNotAvailable || (code == pgsql.CodeQueryCanceled && s.yielded.Load()) {
							s.yielded.Store(true)
							s.leave(ix)
							continue
						}
						return err
					}
				}
				return nil
			})
		})
	}
	err = g.Wait()
	stopWatch()
	<-watched
	if err != nil {
		return nil, err
	}
	if len(s.left) > 0 {
		r.Log.Info().Str("migration", m.ID).Int("indexes", len(s.left)).Bool("a_session_waited", s.yielded.Load()).
			Msg("plain builds of green's indexes yielded; building the rest CONCURRENTLY")
	}
	return s.left, nil
}

// quietBuilds is what buildWhileQuiet's builds and its watcher share.
type quietBuilds struct {
	mu      gosync.Mutex
	pids    map[uint32]bool // the backends building now
	left    []pgmeta.Index
	yielded atomic.Bool
}

func (s *quietBuilds) running(pid uint32, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if on {
		s.pids[pid] = true
	} else {
		delete(s.pids, pid)
	}
}

func (s *quietBuilds) leave(ix pgmeta.Index) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.left = append(s.left, ix)
}

func (s *quietBuilds) building() []int32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	pids := make([]int32, 0, len(s.pids))
	for p := range s.pids {
		pids = append(pids, int32(p))
	}
	return pids
}

// watch polls until ctx ends. While a session other than the builds waits
// for a lock on green, it marks the builds yielded and cancels every one
// running its build statement, on every poll: a build asked for but not
// yet running is cancelled at the next one. When it cannot look,
// it yields too (no build may hold green unwatched), and cancels through a
// fresh connection if its own failed.
func (s *quietBuilds) watch(ctx context.Context, conn *pgxpool.Conn, pool *pgxpool.Pool, green uint32, log zerolog.Logger) {
	tick := time.NewTicker(quietBuildPoll)
	defer tick.Stop()
	const cancelSQL = `SELECT pg_cancel_backend(pid) FROM pg_stat_activity
		WHERE pid = ANY($1::int4[]) AND state = 'active' AND starts_with(query, $2)`
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		pids := s.building()
		var waiting bool
		err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks
			WHERE locktype = 'relation' AND relation = $1::oid AND NOT granted AND pid <> ALL($2::int4[])
			  AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))`, green, pids).Scan(&waiting)
		if ctx.Err() != nil {
			return
		}
		if err != nil && !s.yielded.Load() {
			log.Warn().Err(err).Msg("cannot watch green's plain index builds for waiting sessions: cancelling them")
		}
		if err != nil || waiting {
			s.yielded.Store(true)
		}
		if !s.yielded.Load() || len(pids) == 0 {
			continue
		}
		if _, err := conn.Exec(ctx, cancelSQL, pids, quietBuildTag); err != nil && ctx.Err() == nil {
			if _, err := pool.Exec(ctx, cancelSQL, pids, quietBuildTag); err != nil && ctx.Err() == nil {
				log.Warn().Err(err).Msg("cannot cancel green's plain index builds")
			}
		}
	}
}

package integration

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"slices"
	gosync "sync"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// txPoolProxy stands between a client and PostgreSQL the way pgbouncer does
// in pool_mode=transaction: each client connection is served by two server
// sessions, and the next transaction may go to the other one. It switches
// sessions after every transaction (every statement run outside an explicit
// transaction), which a real pool does only under contention. Like
// pgbouncer 1.21+ with max_prepared_statements, it prepares a client's
// named statements again on the session that needs them, so drivers that
// cache prepared statements work through it. The test cluster trusts local
// connections, so the proxy starts each server session with the client's
// startup message.
type txPoolProxy struct {
	t        testing.TB
	ln       net.Listener
	upstream string // host:port of PostgreSQL

	mu    gosync.Mutex
	conns []net.Conn
}

func startTxPoolProxy(t testing.TB, upstreamDSN string) *txPoolProxy {
	t.Helper()
	u, err := url.Parse(upstreamDSN)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &txPoolProxy{t: t, ln: ln, upstream: u.Host}
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// DSN is upstreamDSN with the proxy's address in place of the server's.
func (p *txPoolProxy) DSN(upstreamDSN string) string {
	u, err := url.Parse(upstreamDSN)
	if err != nil {
		p.t.Fatal(err)
	}
	u.Host = p.ln.Addr().String()
	q := u.Query()
	q.Set("sslmode", "disable")
	u.RawQuery = q.Encode()
	return u.String()
}

func (p *txPoolProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		_ = c.Close()
	}
}

func (p *txPoolProxy) track(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.conns = append(p.conns, c)
}

func (p *txPoolProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.track(c)
		go func() {
			defer c.Close()
			if err := p.serve(c); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				p.t.Logf("txPoolProxy: %v", err)
			}
		}()
	}
}

// serverSession is one of the two server sessions behind a client.
type serverSession struct {
	conn     net.Conn
	fe       *pgproto3.Frontend
	prepared map[string]bool
}

func (p *txPoolProxy) serve(client net.Conn) error {
	be := pgproto3.NewBackend(client, client)
	startup, err := be.ReceiveStartupMessage()
	if err != nil {
		return err
	}
	sm, ok := startup.(*pgproto3.StartupMessage)
	if !ok {
		return fmt.Errorf("unexpected startup message %T", startup)
	}
	var servers [2]*serverSession
	for i := range servers {
		sc, err := net.Dial("tcp", p.upstream)
		if err != nil {
			return err
		}
		p.track(sc)
		defer sc.Close()
		s := &serverSession{conn: sc, fe: pgproto3.NewFrontend(sc, sc), prepared: map[string]bool{}}
		servers[i] = s
		s.fe.Send(sm)
		if err := s.fe.Flush(); err != nil {
			return err
		}
		// The first session's greeting (parameters, its process ID) is
		// the client's; the second's is dropped.
		if err := p.relayUntilReady(s, client, i == 0, nil, nil); err != nil {
			return err
		}
	}

	parses := map[string]pgproto3.Parse{} // the client's named statements
	cur := 0
	var group [][]byte
	var injected []bool // per Parse sent in this group: injected by the proxy?
	executed := false   // the group runs a statement (not only prepares one)
	for {
		msg, err := be.Receive()
		if err != nil {
			return err
		}
		s := servers[cur]
		switch m := msg.(type) {
		case *pgproto3.Terminate:
			return nil
		case *pgproto3.Parse:
			cp := pgproto3.Parse{Name: m.Name, Query: m.Query, ParameterOIDs: slices.Clone(m.ParameterOIDs)}
			if m.Name != "" {
				parses[m.Name] = cp
				s.prepared[m.Name] = true
			}
			injected = append(injected, false)
		case *pgproto3.Bind:
			group, injected = p.prepareOn(s, parses, m.PreparedStatement, group, injected)
		case *pgproto3.Describe:
			if m.ObjectType == 'S' {
				group, injected = p.prepareOn(s, parses, m.Name, group, injected)
			}
		case *pgproto3.Close:
			if m.ObjectType == 'S' {
				delete(parses, m.Name)
				delete(s.prepared, m.Name)
			}
		case *pgproto3.Execute, *pgproto3.Query:
			executed = true
		}
		b, err := msg.Encode(nil)
		if err != nil {
			return err
		}
		group = append(group, b)
		switch msg.(type) {
		case *pgproto3.Sync, *pgproto3.Query:
		default:
			continue
		}
		for _, b := range group {
			if _, err := s.conn.Write(b); err != nil {
				return err
			}
		}
		group = group[:0]
		var idle bool
		if err := p.relayUntilReady(s, client, true, func(rfq *pgproto3.ReadyForQuery) { idle = rfq.TxStatus == 'I' }, &injected); err != nil {
			return err
		}
		injected = injected[:0]
		if idle && executed {
			// A transaction ended: the next one may go to the other
			// session. (Not after a group that only prepared: a driver
			// prepares and then executes, and both went to one session
			// that way, as with a real pool's usual reuse.)
			cur = 1 - cur
		}
		executed = false
	}
}

// prepareOn puts the client's Parse of a named statement ahead in the group
// when the session about to serve it has not prepared it.
func (p *txPoolProxy) prepareOn(s *serverSession, parses map[string]pgproto3.Parse, name string, group [][]byte, injected []bool) ([][]byte, []bool) {
	if name == "" || s.prepared[name] {
		return group, injected
	}
	parse, ok := parses[name]
	if !ok {
		return group, injected
	}
	b, err := parse.Encode(nil)
	if err != nil {
		p.t.Errorf("txPoolProxy: encode parse: %v", err)
		return group, injected
	}
	s.prepared[name] = true
	return append(group, b), append(injected, true)
}

// relayUntilReady copies the session's messages to the client (when
// forward is set) up to and including ReadyForQuery, dropping the
// ParseComplete of each Parse the proxy injected.
func (p *txPoolProxy) relayUntilReady(s *serverSession, client net.Conn, forward bool, onReady func(*pgproto3.ReadyForQuery), pending *[]bool) error {
	for {
		msg, err := s.fe.Receive()
		if err != nil {
			return err
		}
		if _, ok := msg.(*pgproto3.ParseComplete); ok && pending != nil && len(*pending) > 0 {
			wasInjected := (*pending)[0]
			*pending = (*pending)[1:]
			if wasInjected {
				continue
			}
		}
		if forward {
			b, err := msg.Encode(nil)
			if err != nil {
				return err
			}
			if _, err := client.Write(b); err != nil {
				return err
			}
		}
		if rfq, ok := msg.(*pgproto3.ReadyForQuery); ok {
			if onReady != nil {
				onReady(rfq)
			}
			return nil
		}
	}
}

package daemon

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/shadowctl/shadowctl/shadow"
)

// handler serves /metrics, /healthz, GET /v1/migrations[/{id}] and the
// token-guarded POST /v1/migrations/{id}/{pause,resume,postpone}.
func (d *Daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		d.mu.Lock()
		last := d.lastScanOK
		d.mu.Unlock()
		if time.Since(last) > 3*d.cfg.Poll+10*time.Second {
			http.Error(w, "catalog not read since "+last.UTC().Format(time.RFC3339), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /v1/migrations", func(w http.ResponseWriter, r *http.Request) {
		ms, err := d.r.Store.List(r.Context())
		if err != nil {
			httpError(w, err, http.StatusServiceUnavailable)
			return
		}
		now := d.cfg.Clock.Now()
		out := []shadow.Status{}
		for _, m := range ms {
			out = append(out, d.r.Store.Status(r.Context(), m, now))
		}
		writeJSON(w, out)
	})
	mux.HandleFunc("GET /v1/migrations/{id}", func(w http.ResponseWriter, r *http.Request) {
		m, err := d.r.Store.Get(r.Context(), d.r.Pool, r.PathValue("id"))
		if err != nil {
			httpError(w, err, statusOf(err))
			return
		}
		writeJSON(w, d.r.Store.Status(r.Context(), m, d.cfg.Clock.Now()))
	})
	mux.HandleFunc("POST /v1/migrations/{id}/{action}", func(w http.ResponseWriter, r *http.Request) {
		if d.cfg.Token == "" {
			httpError(w, ErrNoToken, http.StatusForbidden)
			return
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(d.cfg.Token)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="shadowctl"`)
			http.Error(w, "a valid bearer token is required", http.StatusUnauthorized)
			return
		}
		id, actor := r.PathValue("id"), d.cfg.Identity+" http "+r.RemoteAddr
		var err error
		switch r.PathValue("action") {
		case "pause":
			err = d.r.Store.Pause(r.Context(), id, actor)
		case "resume":
			err = d.r.Store.Resume(r.Context(), id, actor)
		case "postpone":
			err = d.r.Store.Postpone(r.Context(), id, actor)
		default:
			http.Error(w, "unknown action (pause, resume, postpone)", http.StatusNotFound)
			return
		}
		if err != nil {
			httpError(w, err, statusOf(err))
			return
		}
		m, err := d.r.Store.Get(r.Context(), d.r.Pool, id)
		if err != nil {
			httpError(w, err, statusOf(err))
			return
		}
		writeJSON(w, d.r.Store.Status(r.Context(), m, d.cfg.Clock.Now()))
	})
	return mux
}

func statusOf(err error) int {
	switch {
	case errors.Is(err, shadow.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, shadow.ErrWrongPhase):
		return http.StatusConflict
	}
	return http.StatusInternalServerError
}

func httpError(w http.ResponseWriter, err error, code int) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// Package credproxy reads credentials from credproxy over its Unix socket, with the standard
// library only.
//
//	client := credproxy.New("/run/credproxy/credproxy.sock")
//	secrets, err := client.GetCredential(ctx, id, credproxy.Options{Fields: []string{"access_token"}})
//	var reauth *credproxy.NeedsReauthError
//	if errors.As(err, &reauth) {
//		// The user must reconnect the account: retrying cannot help.
//	}
//
// After the upstream API answered 401 with a value, read past credproxy's cache once with
// Options{NoCache: true}.
package credproxy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Defaults for Client.Retries and Client.MaxWait.
const (
	DefaultRetries = 3
	DefaultMaxWait = 5 * time.Second
)

// Client talks HTTP/1.1 to credproxy's Unix socket.
type Client struct {
	// Retries is how many more times a 503 is retried, each after the answer's Retry-After
	// (1 s if absent) capped at MaxWait.
	Retries int
	MaxWait time.Duration
	// OnRetry, if set, is called before each wait with credproxy's error code.
	OnRetry func(code string, wait time.Duration)
	http    *http.Client
}

// New returns a client for the socket at socketPath.
func New(socketPath string) *Client {
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConns:    4,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{
		Retries: DefaultRetries,
		MaxWait: DefaultMaxWait,
		http:    &http.Client{Transport: transport, Timeout: 10 * time.Second},
	}
}

// Options of one read.
type Options struct {
	Fields  []string // only these secret fields (all when empty)
	NoCache bool     // send Cache-Control: no-cache (after an upstream 401)
}

// Credential is a credential as GET /v1/credentials/{id} answers it. Its String masks the
// secrets, so printing one with %v never shows a value.
type Credential struct {
	ID          string            `json:"id"`
	Secrets     map[string]string `json:"secrets"`
	Metadata    map[string]any    `json:"metadata"`
	ExpiresAt   *string           `json:"expires_at"`
	NeedsReauth bool              `json:"needs_reauth"`
	CacheStatus string            `json:"-"`
}

func (c Credential) String() string {
	names := make([]string, 0, len(c.Secrets))
	for name, value := range c.Secrets {
		names = append(names, name+"="+Mask(value))
	}
	return fmt.Sprintf("Credential{id=%s secrets=[%s] needs_reauth=%t}", c.ID, strings.Join(names, " "), c.NeedsReauth)
}

// Mask is a value safe to log: its length and nothing of its content.
func Mask(value string) string { return fmt.Sprintf("<%d chars>", len(value)) }

// APIError is an answer other than 200: the HTTP status, credproxy's error code and message,
// and its detail when it gives one (why a credential is unusable, which key was wrong).
type APIError struct {
	CredentialID string
	Status       int
	Code         string
	Message      string
	Detail       string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("credential %s: %d %s: %s", e.CredentialID, e.Status, e.Code, e.Message)
}

// NeedsReauthError is 409 needs_reauth: the provider refused the refresh token and the access
// token expired. The platform must ask the user to reconnect.
type NeedsReauthError struct{ APIError }

// UnusableError is 409 credential_unusable.
type UnusableError struct{ APIError }

// NotFoundError is 404: no such credential, or one this caller may not read.
type NotFoundError struct{ APIError }

// UnavailableError is a 503 still after the retries; RetryAfter is the last one sent.
type UnavailableError struct {
	APIError
	RetryAfter time.Duration
}

// GetCredential returns the credential's secrets.
func (c *Client) GetCredential(ctx context.Context, id string, opts Options) (map[string]string, error) {
	cred, err := c.Read(ctx, id, opts)
	if err != nil {
		return nil, err
	}
	return cred.Secrets, nil
}

// Read returns the whole answer. Errors are *NeedsReauthError, *UnusableError,
// *NotFoundError, *UnavailableError, *APIError, or a transport error.
func (c *Client) Read(ctx context.Context, id string, opts Options) (*Credential, error) {
	target := "http://credproxy/v1/credentials/" + url.PathEscape(id)
	if len(opts.Fields) > 0 {
		escaped := make([]string, len(opts.Fields))
		for i, f := range opts.Fields {
			escaped[i] = url.QueryEscape(f)
		}
		target += "?fields=" + strings.Join(escaped, ",")
	}
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
		if err != nil {
			return nil, err
		}
		if opts.NoCache {
			req.Header.Set("Cache-Control", "no-cache")
		}
		resp, err := c.http.Do(req)
		if err != nil {
			return nil, err
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
		resp.Body.Close()
		if err != nil {
			return nil, err
		}
		if resp.StatusCode == http.StatusOK {
			var cred Credential
			if err := json.Unmarshal(body, &cred); err != nil {
				return nil, fmt.Errorf("credential %s: unreadable answer: %w", id, err)
			}
			cred.CacheStatus = resp.Header.Get("Cache-Status")
			return &cred, nil
		}
		var shape struct {
			Error struct{ Code, Message, Detail string } `json:"error"`
		}
		_ = json.Unmarshal(body, &shape)
		e := APIError{CredentialID: id, Status: resp.StatusCode, Code: shape.Error.Code, Message: shape.Error.Message, Detail: shape.Error.Detail}
		if e.Code == "" {
			e.Code = "unknown"
		}
		switch {
		case resp.StatusCode == http.StatusServiceUnavailable:
			after, known := retryAfter(resp.Header.Get("Retry-After"))
			if attempt < c.Retries {
				wait := time.Second
				if known {
					wait = after
				}
				if wait > c.MaxWait {
					wait = c.MaxWait
				}
				if c.OnRetry != nil {
					c.OnRetry(e.Code, wait)
				}
				select {
				case <-time.After(wait):
					continue
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
			return nil, &UnavailableError{APIError: e, RetryAfter: after}
		case resp.StatusCode == http.StatusConflict && e.Code == "needs_reauth":
			return nil, &NeedsReauthError{e}
		case resp.StatusCode == http.StatusConflict && e.Code == "credential_unusable":
			return nil, &UnusableError{e}
		case resp.StatusCode == http.StatusNotFound:
			return nil, &NotFoundError{e}
		default:
			return nil, &e
		}
	}
}

// retryAfter parses Retry-After in seconds (credproxy sends whole seconds).
func retryAfter(value string) (time.Duration, bool) {
	secs, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
	if err != nil || secs < 0 {
		return 0, false
	}
	return time.Duration(secs * float64(time.Second)), true
}

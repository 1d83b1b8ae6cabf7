// Command credproxy-client reads one credential from credproxy over its Unix socket.
//
//	credproxy-client --socket PATH [--field NAME] [--no-cache] [--retries N] [--max-wait SECONDS] ID
//
// With --field it prints that field's value to stdout (what a worker script consumes);
// without, the credential's field names only. Diagnostics go to stderr. Exit codes: 0 ok,
// 2 needs_reauth, 3 credential_unusable, 4 not found, 5 unavailable after retries, 1 other.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"example.com/credproxy-worker/credproxy"
)

const (
	exitOK          = 0
	exitOther       = 1
	exitNeedsReauth = 2
	exitUnusable    = 3
	exitNotFound    = 4
	exitUnavailable = 5
)

func say(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "credproxy-client: "+format+"\n", args...)
}

func main() { os.Exit(run(os.Args[1:])) }

func run(argv []string) int {
	flags := flag.NewFlagSet("credproxy-client", flag.ContinueOnError)
	socket := flags.String("socket", os.Getenv("CREDPROXY_SOCKET"), "credproxy's Unix socket (default: $CREDPROXY_SOCKET)")
	field := flags.String("field", "", "print this secret field's value to stdout")
	noCache := flags.Bool("no-cache", false, "read past credproxy's cache (after an upstream 401)")
	retries := flags.Int("retries", credproxy.DefaultRetries, "retries on 503")
	maxWait := flags.Float64("max-wait", credproxy.DefaultMaxWait.Seconds(), "cap on each Retry-After wait, seconds")
	flags.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: credproxy-client --socket PATH [--field NAME] [--no-cache] [--retries N] [--max-wait SECONDS] ID")
		flags.PrintDefaults()
	}
	// flag stops at the first non-flag: accept the id anywhere by parsing what follows it too.
	var ids []string
	for {
		if err := flags.Parse(argv); err != nil {
			return exitOther // flag has printed the reason and the usage
		}
		if flags.NArg() == 0 {
			break
		}
		ids = append(ids, flags.Arg(0))
		argv = flags.Args()[1:]
	}
	if *socket == "" || len(ids) != 1 || *retries < 0 || *maxWait < 0 {
		flags.Usage()
		return exitOther
	}
	id := ids[0]

	client := credproxy.New(*socket)
	client.Retries = *retries
	client.MaxWait = time.Duration(*maxWait * float64(time.Second))
	client.OnRetry = func(code string, wait time.Duration) { say("503 %s; retrying in %s", code, wait) }
	opts := credproxy.Options{NoCache: *noCache}
	if *field != "" {
		opts.Fields = []string{*field}
	}

	cred, err := client.Read(context.Background(), id, opts)
	var (
		reauth      *credproxy.NeedsReauthError
		unusable    *credproxy.UnusableError
		notFound    *credproxy.NotFoundError
		unavailable *credproxy.UnavailableError
		other       *credproxy.APIError
	)
	switch {
	case err == nil:
	case errors.As(err, &reauth):
		say("credential %s needs_reauth: the user must reconnect the account", id)
		return exitNeedsReauth
	case errors.As(err, &unusable):
		reason := unusable.Detail
		if reason == "" {
			reason = unusable.Message
		}
		say("credential %s credential_unusable: %s", id, reason)
		return exitUnusable
	case errors.As(err, &notFound):
		say("credential %s not found (%s)", id, notFound.Code)
		return exitNotFound
	case errors.As(err, &unavailable):
		say("credential %s unavailable after %d retries: %s (Retry-After: %s)", id, *retries, unavailable.Code, unavailable.RetryAfter)
		return exitUnavailable
	case errors.As(err, &other):
		say("%s", other)
		return exitOther
	default:
		say("cannot reach credproxy at %s: %s", *socket, err)
		return exitOther
	}

	if cred.NeedsReauth {
		expires := "its expiry"
		if cred.ExpiresAt != nil {
			expires = *cred.ExpiresAt
		}
		say("warning: credential %s needs re-authorisation; its token works until %s", cred.ID, expires)
	}
	say("credential %s (%s)", cred.ID, cred.CacheStatus)
	if *field != "" {
		value, ok := cred.Secrets[*field]
		if !ok {
			say("credential %s has no field %q", cred.ID, *field)
			return exitOther
		}
		fmt.Println(value)
		return exitOK
	}
	names := make([]string, 0, len(cred.Secrets))
	for name := range cred.Secrets {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Println(name)
	}
	return exitOK
}

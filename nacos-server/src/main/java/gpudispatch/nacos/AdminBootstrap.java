package gpudispatch.nacos;

import com.alibaba.nacos.config.server.model.User;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.context.event.ApplicationReadyEvent;
import org.springframework.context.event.EventListener;
import org.springframework.stereotype.Component;

/**
 * The admin user the server is started with, when it is given one: {@code
 * gpudispatch.nacos.admin.username} (default {@code nacos}) and {@code gpudispatch.nacos.admin.password}
 * (best passed in the environment, as {@code GPUDISPATCH_NACOS_ADMIN_PASSWORD}, not on the command
 * line where every local user can read it).
 *
 * <p>Once the server is up, and again at every start, that user is made to exist in Nacos's user
 * table with that password and the admin role; the settings are authoritative. Nacos's own schema
 * creates a user {@code nacos} with password {@code nacos}; when the admin is another user, that
 * default user is removed if its password is still the default one. Without a password nothing is
 * done and the store stays as Nacos 2.0.4 makes it.
 *
 * <p>In cluster mode writes go through Raft, which needs a leader, and the nodes race to write the
 * same rows, so this retries (reading back what is there) until the rows are right. Until then
 * {@link #ready()} is false and the readiness endpoint answers 500.
 */
@Component
public class AdminBootstrap {

    static final String DEFAULT_USER = "nacos";

    private static final Logger LOG = LoggerFactory.getLogger(AdminBootstrap.class);

    @Value("${gpudispatch.nacos.admin.username:nacos}")
    private String username;

    @Value("${gpudispatch.nacos.admin.password:}")
    private String password;

    @Autowired
    private UserStore store;

    private volatile boolean done;

    private volatile String lastFailure = "not started";

    public boolean ready() {
        return done || password.isEmpty();
    }

    public String lastFailure() {
        return lastFailure;
    }

    @EventListener(ApplicationReadyEvent.class)
    public void start() {
        if (password.isEmpty()) {
            return;
        }
        Thread thread = new Thread(this::run, "gpu-dispatch-admin-bootstrap");
        thread.setDaemon(true);
        thread.start();
    }

    private void run() {
        while (!done) {
            try {
                ensure();
                done = true;
                LOG.info("admin user '{}' is in place", username);
            } catch (Exception e) {
                lastFailure = e.toString();
                LOG.warn("setting up admin user '{}' failed, retrying: {}", username, e.toString());
                try {
                    Thread.sleep(1000);
                } catch (InterruptedException stop) {
                    return;
                }
            }
        }
    }

    private void ensure() {
        User user = store.findUser(username);
        if (user == null) {
            store.createUser(username, password);
        } else if (!store.passwordMatchesInStore(username, password)) {
            store.updatePassword(username, password);
        }
        if (!store.isGlobalAdmin(username)) {
            store.grantAdmin(username);
        }
        if (!DEFAULT_USER.equals(username) && store.passwordMatchesInStore(DEFAULT_USER, DEFAULT_USER)) {
            store.deleteRole(UserStore.GLOBAL_ADMIN_ROLE, DEFAULT_USER);
            store.deleteUser(DEFAULT_USER);
        }
        // Read back: another node may have raced us, or a write may not have been applied.
        if (!store.passwordMatchesInStore(username, password) || !store.isGlobalAdmin(username)) {
            throw new IllegalStateException("admin user not in the store yet");
        }
    }
}

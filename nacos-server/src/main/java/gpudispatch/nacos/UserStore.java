package gpudispatch.nacos;

import com.alibaba.nacos.auth.common.AuthConfigs;
import com.alibaba.nacos.auth.model.Permission;
import com.alibaba.nacos.config.server.auth.PermissionInfo;
import com.alibaba.nacos.config.server.auth.PermissionPersistService;
import com.alibaba.nacos.config.server.auth.RoleInfo;
import com.alibaba.nacos.config.server.auth.RolePersistService;
import com.alibaba.nacos.config.server.auth.UserPersistService;
import com.alibaba.nacos.config.server.model.Page;
import com.alibaba.nacos.config.server.model.User;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.regex.Pattern;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.scheduling.annotation.Scheduled;
import org.springframework.security.crypto.bcrypt.BCryptPasswordEncoder;
import org.springframework.stereotype.Component;

/**
 * Nacos's users, roles and permissions, kept where Nacos keeps them: the {@code users},
 * {@code roles} and {@code permissions} tables of its own store (Derby under
 * {@code ${nacos.home}/data}, replicated by JRaft in cluster mode), reached through the config
 * module's persist services. Passwords are BCrypt hashes, as Nacos stores them.
 *
 * <p>The rules are Nacos's: a user with role {@link #GLOBAL_ADMIN_ROLE} may do everything; other
 * users may do what a permission of one of their roles allows, where the permission's resource is a
 * pattern ({@code *} matches anything) over {@code namespace:group:naming/service} (or
 * {@code ...:config/dataId}) and its action contains the requested one ({@code r}, {@code w},
 * {@code rw}); {@code console/...} resources are for admins only. Users, roles and permissions are
 * cached and reloaded every 15 s (and read from the store on a miss), as Nacos does, unless
 * {@code nacos.core.auth.caching.enabled=false}: logins and permission checks then go on while a
 * cluster elects a new leader for the store (every read of the replicated store needs one).
 */
@Component
public class UserStore {

    public static final String GLOBAL_ADMIN_ROLE = "ROLE_ADMIN";

    public static final String CONSOLE_RESOURCE_PREFIX = "console/";

    public static final String UPDATE_PASSWORD_RESOURCE = CONSOLE_RESOURCE_PREFIX + "user/password";

    private static final Logger LOG = LoggerFactory.getLogger(UserStore.class);

    private final BCryptPasswordEncoder encoder = new BCryptPasswordEncoder();

    @Autowired
    private UserPersistService users;

    @Autowired
    private RolePersistService roles;

    @Autowired
    private PermissionPersistService permissions;

    @Autowired
    private AuthConfigs authConfigs;

    private volatile Map<String, User> usersByName = new ConcurrentHashMap<>();

    private volatile Map<String, List<RoleInfo>> rolesByUser = new ConcurrentHashMap<>();

    private volatile Map<String, List<PermissionInfo>> permissionsByRole = new ConcurrentHashMap<>();

    // -- users ------------------------------------------------------------------

    /** The user as the store has it now (no cache). */
    public User findUser(String username) {
        return users.findUserByUsername(username);
    }

    /** The user, from the cache when it is on and holds it (as Nacos's user details service). */
    private User cachedUser(String username) {
        User cached = usersByName.get(username);
        if (cached != null && authConfigs.isCachingEnabled()) {
            return cached;
        }
        User found = users.findUserByUsername(username);
        if (found != null) {
            usersByName.put(username, found);
        }
        return found;
    }

    /** Whether {@code username} exists and {@code rawPassword} is its password (a login). */
    public boolean passwordMatches(String username, String rawPassword) {
        if (username == null || username.isEmpty() || rawPassword == null) {
            return false;
        }
        User user = cachedUser(username);
        return user != null && encoder.matches(rawPassword, user.getPassword());
    }

    /** The same, read from the store itself (for checking what was just written). */
    boolean passwordMatchesInStore(String username, String rawPassword) {
        User user = users.findUserByUsername(username);
        return user != null && encoder.matches(rawPassword, user.getPassword());
    }

    public void createUser(String username, String rawPassword) {
        users.createUser(username, encoder.encode(rawPassword));
        usersByName.remove(username);
    }

    public void updatePassword(String username, String rawPassword) {
        users.updateUserPassword(username, encoder.encode(rawPassword));
        usersByName.remove(username);
    }

    public void deleteUser(String username) {
        users.deleteUser(username);
        usersByName.remove(username);
    }

    /** A page of users, without their password hashes. */
    public Page<User> usersPage(int pageNo, int pageSize) {
        Page<User> page = users.getUsers(pageNo, pageSize);
        if (page != null && page.getPageItems() != null) {
            for (User user : page.getPageItems()) {
                user.setPassword(null);
            }
        }
        return page;
    }

    public List<String> usersLike(String username) {
        return users.findUserLikeUsername(username);
    }

    // -- roles and permissions ----------------------------------------------------

    public List<RoleInfo> rolesOf(String username) {
        List<RoleInfo> cached = rolesByUser.get(username);
        if (cached != null && authConfigs.isCachingEnabled()) {
            return cached;
        }
        Page<RoleInfo> page = roles.getRolesByUserName(username, 1, Integer.MAX_VALUE);
        List<RoleInfo> found = page == null || page.getPageItems() == null ? Collections.emptyList()
                : page.getPageItems();
        if (!found.isEmpty()) {
            rolesByUser.put(username, found);
        }
        return found;
    }

    public boolean isGlobalAdmin(String username) {
        return rolesOf(username).stream().anyMatch(role -> GLOBAL_ADMIN_ROLE.equals(role.getRole()));
    }

    public List<PermissionInfo> permissionsOf(String role) {
        List<PermissionInfo> cached = permissionsByRole.get(role);
        if (cached != null && authConfigs.isCachingEnabled()) {
            return cached;
        }
        Page<PermissionInfo> page = permissions.getPermissions(role, 1, Integer.MAX_VALUE);
        List<PermissionInfo> found = page == null || page.getPageItems() == null ? Collections.emptyList()
                : page.getPageItems();
        if (!found.isEmpty()) {
            permissionsByRole.put(role, found);
        }
        return found;
    }

    /** Nacos's permission rule (see the class comment). */
    public boolean hasPermission(String username, Permission permission) {
        if (UPDATE_PASSWORD_RESOURCE.equals(permission.getResource())) {
            return true; // the controller checks that it is the user's own password, or an admin
        }
        List<RoleInfo> userRoles = rolesOf(username);
        if (userRoles.stream().anyMatch(role -> GLOBAL_ADMIN_ROLE.equals(role.getRole()))) {
            return true;
        }
        if (permission.getResource().startsWith(CONSOLE_RESOURCE_PREFIX)) {
            return false;
        }
        for (RoleInfo role : userRoles) {
            for (PermissionInfo granted : permissionsOf(role.getRole())) {
                String pattern = granted.getResource().replaceAll("\\*", ".*");
                if (granted.getAction().contains(permission.getAction())
                        && Pattern.matches(pattern, permission.getResource())) {
                    return true;
                }
            }
        }
        return false;
    }

    public Page<RoleInfo> rolesPage(String username, int pageNo, int pageSize) {
        Page<RoleInfo> page = roles.getRolesByUserName(username, pageNo, pageSize);
        return page == null ? new Page<>() : page;
    }

    public List<String> rolesLike(String role) {
        return roles.findRolesLikeRoleName(role);
    }

    /** Give {@code username} the role {@code role}; nobody may be made admin this way, as in Nacos. */
    public void addRole(String role, String username) {
        if (users.findUserByUsername(username) == null) {
            throw new IllegalArgumentException("user '" + username + "' not found!");
        }
        if (GLOBAL_ADMIN_ROLE.equals(role)) {
            throw new IllegalArgumentException("role '" + GLOBAL_ADMIN_ROLE + "' is not permitted to create!");
        }
        roles.addRole(role, username);
        rolesByUser.remove(username);
    }

    /** For the initial admin only (see {@link AdminBootstrap}). */
    void grantAdmin(String username) {
        roles.addRole(GLOBAL_ADMIN_ROLE, username);
        rolesByUser.remove(username);
    }

    public void deleteRole(String role, String username) {
        if (username == null || username.isEmpty()) {
            roles.deleteRole(role);
            rolesByUser.clear();
        } else {
            roles.deleteRole(role, username);
            rolesByUser.remove(username);
        }
    }

    public Page<PermissionInfo> permissionsPage(String role, int pageNo, int pageSize) {
        Page<PermissionInfo> page = permissions.getPermissions(role, pageNo, pageSize);
        return page == null ? new Page<>() : page;
    }

    public void addPermission(String role, String resource, String action) {
        if (rolesPage("", 1, Integer.MAX_VALUE).getPageItems().stream().noneMatch(r -> role.equals(r.getRole()))) {
            throw new IllegalArgumentException("role " + role + " not found!");
        }
        permissions.addPermission(role, resource, action);
        permissionsByRole.remove(role);
    }

    public void deletePermission(String role, String resource, String action) {
        permissions.deletePermission(role, resource, action);
        permissionsByRole.remove(role);
    }

    /** Reload the caches, as Nacos does every 15 s (what another node changed shows up here then). */
    @Scheduled(initialDelay = 5000, fixedDelay = 15000)
    public void reload() {
        try {
            Page<User> allUsers = users.getUsers(1, Integer.MAX_VALUE);
            if (allUsers != null && allUsers.getPageItems() != null) {
                Map<String, User> byName = new ConcurrentHashMap<>();
                for (User user : allUsers.getPageItems()) {
                    byName.put(user.getUsername(), user);
                }
                usersByName = byName;
            }
        } catch (Exception e) {
            LOG.warn("[LOAD-USERS] reloading users failed: {}", e.toString());
        }
        try {
            Page<RoleInfo> all = roles.getRolesByUserName("", 1, Integer.MAX_VALUE);
            if (all == null || all.getPageItems() == null) {
                return;
            }
            Map<String, List<RoleInfo>> byUser = new ConcurrentHashMap<>();
            Map<String, List<PermissionInfo>> byRole = new ConcurrentHashMap<>();
            for (RoleInfo role : all.getPageItems()) {
                byUser.computeIfAbsent(role.getUsername(), name -> new ArrayList<>()).add(role);
                if (!byRole.containsKey(role.getRole())) {
                    Page<PermissionInfo> granted = permissions.getPermissions(role.getRole(), 1, Integer.MAX_VALUE);
                    byRole.put(role.getRole(), granted == null || granted.getPageItems() == null
                            ? new ArrayList<>() : granted.getPageItems());
                }
            }
            rolesByUser = byUser;
            permissionsByRole = byRole;
        } catch (Exception e) {
            LOG.warn("[LOAD-ROLES] reloading roles and permissions failed: {}", e.toString());
        }
    }
}
